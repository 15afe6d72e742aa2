"""Perplexity (issue 4 §4, issue 9 §2), SmolLM2-135M, held-out wiki text, batch 4, side by side in one process:

1. throughput of ``evaluation.perplexity`` vs a bare forward over the same 8x256 tokens (target >= 0.90);
2. against the reference, lm-eval itself: ``HFLM.loglikelihood_rolling`` (what its perplexity tasks run) on
   the same model and text. The text is cut into pieces of exactly ``L = 256`` lm-eval tokens (pieces whose
   decoded text re-encodes to the same tokens), so lm-eval scores each piece in one window, [prefix] + 255
   tokens predicting all 256, and ours scores the same windows as [prefix] + 256 ids. Checked first: the same
   perplexity to 1e-4 relative (one float32 log-softmax each). Ratio: lm-eval seconds / ours.
"""

import math

import torch
from common_bench import interleaved, save
from reference import lm_eval_perplexity

from common.core import data, evaluation, models

KEY = "smollm2-135m"
L, N, BATCH = 256, 8, 4


def exact_pieces(lm, texts, n: int, length: int) -> list[list[int]]:
    """``n`` pieces of ``length`` lm-eval tokens whose decoded text lm-eval encodes back to them."""
    pieces = []
    for text in texts:
        ids = lm.tok_encode(text)
        for start in range(0, len(ids) - length + 1, length):
            piece = ids[start:start + length]
            if lm.tok_encode(lm.tok_decode(piece)) == piece:
                pieces.append(piece)
            if len(pieces) == n:
                return pieces
    raise RuntimeError(f"the corpus holds only {len(pieces)} round-tripping pieces of {length} tokens")


def main() -> None:
    from lm_eval.models.huggingface import HFLM

    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", N, L)

    def bare():
        with torch.no_grad():
            for batch in windows.split(BATCH):
                model(input_ids=batch, use_cache=False)

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=L)
    pieces = exact_pieces(lm, ["\n\n".join(d["extract"] for d in data.wiki_split("heldout"))], N, L)
    texts = [lm.tok_decode(p) for p in pieces]
    ours_windows = torch.tensor([[lm.prefix_token_id, *p] for p in pieces])

    def ours():
        return evaluation.perplexity(model, ours_windows, BATCH)

    def reference():
        return lm_eval_perplexity(lm, texts, N * L)[0]

    ppl_ours, ppl_ref = ours(), reference()
    assert math.isclose(ppl_ours, ppl_ref, rel_tol=1e-4), f"ours {ppl_ours} vs lm-eval {ppl_ref}"
    times = interleaved({"bare_forward": bare, "perplexity": lambda: evaluation.perplexity(model, windows, BATCH),
                         "ours_same_text": ours, "lm_eval_rolling": reference})
    ratios = {"throughput_vs_bare_forward": times["bare_forward"] / times["perplexity"],
              "lm_eval_rolling_over_ours": times["lm_eval_rolling"] / times["ours_same_text"]}
    for name, r in ratios.items():
        print(f"{name:30s} {r:6.3f}x")
    print(f"perplexity: ours {ppl_ours:.4f}, lm-eval loglikelihood_rolling {ppl_ref:.4f}")
    print("->", save("perplexity_throughput", {
        "model": KEY, "tokens": list(windows.shape), "seconds": times,
        "perplexity": {"ours": ppl_ours, "lm_eval_rolling": ppl_ref}, "ratios": ratios,
        "reference": "lm-eval HFLM.loglikelihood_rolling, max_length 256, same batch size",
        "target": "throughput >= 0.90; lm-eval / ours >= 1"}))


if __name__ == "__main__":
    main()
