"""Shared library of the outlier-structure replication suite (import name ``common``).

Each module has one job; see ``docs/ARCHITECTURE.md`` for the map. Notebooks orchestrate and
narrate, the functions here compute.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the package is installed editable from ``src/common``).
REPO_ROOT = Path(__file__).resolve().parents[2]
