"""Perplexity throughput vs a bare forward over the same tokens (issue 4 §4: >= 90%). SmolLM2-135M,
8x256 held-out wiki tokens, batch 4, both sides interleaved in one process."""

import torch
from common_bench import interleaved, save

from common import data, evaluation, models

KEY = "smollm2-135m"


def main() -> None:
    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", 8, 256)

    def bare():
        with torch.no_grad():
            for batch in windows.split(4):
                model(input_ids=batch, use_cache=False)

    times = interleaved({"bare_forward": bare, "perplexity": lambda: evaluation.perplexity(model, windows, 4)})
    ratio = times["bare_forward"] / times["perplexity"]
    print(f"perplexity throughput = {ratio:.3f} x bare forward")
    print("->", save("perplexity_throughput", {"model": KEY, "tokens": list(windows.shape), "seconds": times,
                                              "ratios": {"throughput_vs_bare_forward": ratio},
                                              "target": ">= 0.90"}))


if __name__ == "__main__":
    main()
