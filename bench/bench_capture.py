"""Statistics capture (issue 3 §5, issue 9 §2), SmolLM2-135M, 8x256 wiki tokens, side by side in one process:

1. overhead: plain backbone forward vs the position-0 statistics detection needs (every layer: hidden +
   intermediate) vs whole-tensor statistics (top-3 + median over all positions); target pos-0 overhead <= 10%;
2. against the reference (locuslab/massive-activations, ``reference.stored_massive_stats``): every layer's
   hidden and intermediate states stored whole, then post-processed, vs our hooks keeping only the
   statistics (``capture(..., whole=True)``). Checked first: the same position-0 vectors, top-3 values and
   medians (float32 vs the reference's float64 sort: 1e-5 relative). Time and peak-memory ratios.
"""

import torch
from common_bench import interleaved, peak_memory_mb, save
from reference import stored_massive_stats

from common.core import arch, capture, data, models

KEY = "smollm2-135m"
POINTS = ("hidden", "inter")


def main() -> None:
    model, tok = models.load_model(KEY)
    ids = data.token_windows(tok, KEY, "wiki", 8, 256)
    body = arch.backbone(model)

    def plain():
        with torch.no_grad():
            body(input_ids=ids, use_cache=False)

    def ours():
        return capture.capture(model, [ids], points=POINTS, whole=True)

    def reference():
        return stored_massive_stats(model, [ids])

    a, b = ours(), reference()
    for point in POINTS:
        for kind in ("pos0", "top", "median"):
            x, y = getattr(a, kind)[point], getattr(b, kind)[point]
            assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6), f"{kind}[{point}] differs"
    times = interleaved({
        "plain_forward": plain,
        "pos0_stats": lambda: capture.capture(model, [ids], points=POINTS),
        "whole_tensor_stats": ours,
        "reference_stored_states": reference,
    }, repeats=5)
    memory = {"whole_tensor_stats": peak_memory_mb(ours), "reference_stored_states": peak_memory_mb(reference)}
    ratios = {"pos0_stats_over_plain": times["pos0_stats"] / times["plain_forward"],
              "whole_tensor_stats_over_plain": times["whole_tensor_stats"] / times["plain_forward"],
              "reference_over_ours_time": times["reference_stored_states"] / times["whole_tensor_stats"],
              "reference_over_ours_peak_memory": memory["reference_stored_states"] / memory["whole_tensor_stats"]}
    for name, r in ratios.items():
        print(f"{name:34s} {r:7.3f}x")
    print(f"peak memory added (MiB): {memory}")
    print("->", save("capture_overhead", {
        "model": KEY, "tokens": list(ids.shape), "seconds": times, "peak_memory_mib": memory, "ratios": ratios,
        "reference": "locuslab/massive-activations main_llm.py --exp2: store every layer's states, then sort",
        "target": "pos0 overhead <= 10%; reference / ours > 1 (time and memory)"}))


if __name__ == "__main__":
    main()
