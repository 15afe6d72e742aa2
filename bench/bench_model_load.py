"""Model load from the float cache vs the first GGUF -> float conversion (issue 3 §5: >= 10x faster).
Both measured in one process: a fresh temporary cache is filled by the conversion, then loaded."""

import os
import tempfile
import time

from common_bench import save

from common.core import models

KEY = "smollm2-135m"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["REPRO_CACHE"] = tmp
        spec = models.get_spec(KEY)
        t = time.perf_counter()
        models.convert_gguf(spec)
        convert = time.perf_counter() - t
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            models.load_model(KEY)
            loads.append(time.perf_counter() - t)
    load = sorted(loads)[1]
    ratio = convert / load
    print(f"first conversion {convert:.1f} s, cached load {load:.2f} s (median of 3): {ratio:.1f}x faster")
    print("->", save("model_load", {"model": KEY, "seconds": {"first_conversion": convert, "cached_load": load},
                                   "ratios": {"conversion_over_cached_load": ratio}, "target": ">= 10x"}))


if __name__ == "__main__":
    main()
