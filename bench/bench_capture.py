"""Overhead of statistics capture (issue 3 §5): plain backbone forward vs the position-0 statistics that
detection needs (every layer: hidden + intermediate) vs whole-tensor statistics (top-3 + median over all
positions). SmolLM2-135M, 8x256 wiki tokens, measured side by side in one process."""

import torch
from common_bench import interleaved, save

from common import arch, capture, data, models

KEY = "smollm2-135m"


def main() -> None:
    model, tok = models.load_model(KEY)
    ids = data.token_windows(tok, KEY, "wiki", 8, 256)
    body = arch.backbone(model)

    def plain():
        with torch.no_grad():
            body(input_ids=ids, use_cache=False)

    times = interleaved({
        "plain_forward": plain,
        "pos0_stats": lambda: capture.capture(model, [ids], points=("hidden", "inter")),
        "whole_tensor_stats": lambda: capture.capture(model, [ids], points=("hidden", "inter"), whole=True),
    }, repeats=9)
    ratios = {"pos0_stats_over_plain": times["pos0_stats"] / times["plain_forward"],
              "whole_tensor_stats_over_plain": times["whole_tensor_stats"] / times["plain_forward"]}
    for name, r in ratios.items():
        print(f"{name:32s} {r:6.3f}x  ({(r - 1) * 100:+.1f}% overhead)")
    print("->", save("capture_overhead", {"model": KEY, "tokens": list(ids.shape), "seconds": times,
                                         "ratios": ratios, "target": "pos0 overhead <= 10%"}))


if __name__ == "__main__":
    main()
