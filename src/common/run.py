"""``python -m common.run``: the short name of ``python -m common.reporting.run`` (the notebook runner)."""

import sys

from common.reporting.run import main

if __name__ == "__main__":
    sys.exit(main())
