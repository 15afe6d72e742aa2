"""The paper numbers of House of Cards (Oh et al., arXiv 2410.01866 v2) and of the papers it builds on: Sun et al.,
"Massive activations" (SunMA, arXiv 2402.17762) and Yu et al., "The super weight" (arXiv 2411.07191).

One place for every number the library, notebooks 01-03 and ``claims.yaml`` compare against (claims write
``paper_value: "hoc.paper:NAME[.key...]"``). Each constant names its exact source: paper, table / figure / section,
row, column, model, corpus, and how it was converted to our units. Units are ours: layer and channel indices 0-based
(the papers print 1-based layers); accuracies as printed (%) unless a name says ``DELTA`` (a fraction); perplexity
ratios are attacked / intact. Numbers are transcribed from the research note ``house_of_cards.md`` (§2.4 Table 1,
§3.4 Tables 3/4/8, §2.1 Table 7); the SunMA numbers there are quotes ([SunQ]) the note could not check against the
SunMA PDF. Derived values are computed here from the transcribed ones, never typed.
"""

from __future__ import annotations

# --- SunMA §2.2: the massive-activation criterion (HoC §2.2 applies it to the FFN intermediate state) -------------
#: SunMA §2.2 (quoted, house_of_cards.md §1.1): an activation is massive if |x| > 100 ...
SUN_MIN_ABS = 100.0
#: ... and |x| is "at least or around 1,000 times" the median |x| of its hidden state (SunMA §2.2).
SUN_MIN_RATIO = 1000.0
#: SunMA §2, Fig. 1 / the quoted text (house_of_cards.md §1.1), LLaMA2-7B, residual stream after layer 2 (1-based),
#: position 0 / first delimiter: largest |h| ~2,500 vs median |h| ~0.2, so top / median ~2,500 / 0.2 = 12,500 (an
#: order-of-magnitude reading of rounded numbers; the locuslab plot's z-axis stops at 2,400).
SUN_TOP_ABS = 2500.0
SUN_MEDIAN_ABS = 0.2
SUN_TOP_RATIO = round(SUN_TOP_ABS / SUN_MEDIAN_ABS)

#: SunMA Table 3 (house_of_cards.md §1.1), LLaMA2-7B, the 4 massive activations (dims 1415 / 2533 at the start
#: token and the first delimiter, output of layer 2, 1-based) set to zero or to their mean over 100 RedPajama
#: sequences: WikiText-2 perplexity (locuslab protocol, 4096-token windows) and the 5-task zero-shot mean (%).
#: The C4 / PG-19 columns of Table 3 were not retrieved.
SUN_TABLE3 = {
    "ppl/original": 5.47, "ppl/zero": float("inf"), "ppl/mean": 5.47,
    "acc/original": 68.95, "acc/zero": 36.75, "acc/mean": 68.94,
}
#: SunMA Table 3, LLaMA2-7B, WikiText-2: set-to-mean perplexity / original perplexity (5.47 / 5.47).
SUN_MEAN_PPL_RATIO = SUN_TABLE3["ppl/mean"] / SUN_TABLE3["ppl/original"]
#: SunMA Table 3, LLaMA2-7B, WikiText-2: set-to-zero perplexity / original (inf / 5.47; the paper prints "inf").
SUN_ZERO_PPL_RATIO = SUN_TABLE3["ppl/zero"] / SUN_TABLE3["ppl/original"]

# --- HoC Table 7 (and SunMA §2): massive layer, massive hidden dims and top-5 intermediate channels ---------------
#: Per paper model, 0-based. ``layer``: HoC Table 7's massive-weight layer minus 1 (the paper prints layer 2 / 4).
#: ``channels``: HoC Table 7, base model, top-5 intermediate channels in the paper's order (0-based channel ids).
#: ``hidden_dims``: the residual-stream dims the massive activations sit in; sources differ per model, see
#: ``HIDDEN_DIMS_SOURCE``. None for Llama-3-8B: no paper gives them (the dims a third-party extension of the
#: locuslab code plots are in ``CROSS_CHECK_HIDDEN_DIMS``, not a paper value).
TABLE7 = {
    "llama-2-7b": {"layer": 1, "hidden_dims": [1415, 2533], "channels": [7890, 10411, 1192, 8731, 5843]},
    "llama-2-13b": {"layer": 3, "hidden_dims": [2100, 4743], "channels": [7678, 8811, 11371, 6619, 12281]},
    "llama-3-8b": {"layer": 1, "hidden_dims": None, "channels": [2427, 198, 6412, 12657, 591]},
    "mistral-7b": {"layer": 1, "hidden_dims": [2070], "channels": [7310, 8572, 2514, 1878, 8693]},
}
HIDDEN_DIMS_SOURCE = {
    "llama-2-7b": "SunMA Fig. 1 / §2 (dims 1415, 2533)",
    "llama-2-13b": "SunMA §2 (dims 2100, 4743)",
    "llama-3-8b": "not in any paper (see CROSS_CHECK_HIDDEN_DIMS)",
    "mistral-7b": "Yu et al. super-weight index, down_proj row 2070 of layers[1] (house_of_cards.md §1.5 [SW])",
}
#: Not paper values: the hidden dims an unidentified third-party extension of the locuslab code sets in its plot
#: ticks (house_of_cards.md §1.5 / §4.5 [fork]); a cross-check for the paper profile's own detection only.
CROSS_CHECK_HIDDEN_DIMS = {"llama-3-8b": [788, 1384, 4062]}
TABLE7_REF = ("HoC Table 7 (massive layer, top-5 channels; paper layers are 1-based); hidden dims: SunMA §2 (Llama-2), "
              "Yu et al. super-weight index (Mistral)")
#: HoC Table 7 (house_of_cards.md §2.1), every model: the massive-weight layer, 0-based (printed layer - 1), and the
#: model's number of decoder layers. What "an early layer" means in the paper: index 0-9, the first 0-20% of depth.
TABLE7_LAYER_ALL = {m: {"layer": layer, "n_layers": n} for m, (layer, n) in {
    "llama-2-7b": (1, 32), "llama-2-13b": (3, 40), "llama-3-8b": (1, 32), "llama-3-70b": (3, 80),
    "llama-3.1-405b": (5, 126), "mistral-7b": (1, 32), "mixtral-8x7b": (1, 32), "phi-3-mini": (2, 32),
    "phi-3-medium": (5, 40), "gemma-2-2b": (1, 26), "gemma-2-9b": (0, 42), "gemma-2-27b": (9, 46),
}.items()}
#: Not a paper number. HoC Alg. 1 computes the massive indices from the BOS intermediate state at position 0, and
#: with causal attention position 0 sees only itself, so for a BOS model the position-0 state cannot depend on the
#: rest of the prompt: relative spread exactly 0 (house_of_cards.md §2.1, marked [mine]; HoC App. C shows the BOS
#: carrying the massive activations in every family).
BOS_PROMPT_SPREAD = 0

# --- HoC Table 1: the massive-weight attack on Llama-3-8B, k = 5 ----------------------------------------------------
#: HoC Table 1, rows Llama-3-8B / top-5 zeroing / top-5 retaining, the three perplexity columns (locuslab protocol:
#: 4096-token windows; WikiText-2 test without special tokens, C4 and PG-19 first 100 windows).
TABLE1_PPL_BY_CORPUS = {
    "wikitext2": {"base": 5.75, "zero_top5": 104.57, "keep_top5": 10.15},
    "c4": {"base": 9.94, "zero_top5": 132.83, "keep_top5": 23.98},
    "pg19": {"base": 8.98, "zero_top5": 130.83, "keep_top5": 28.72},
}
#: HoC Table 1, Llama-3-8B, column WikiText (WikiText-2): intact, top-5 zeroed, only the top-5 kept. Our perplexity
#: is measured on WikiText-like text only (small: Wikipedia summaries; paper profile: WikiText-2), so this column,
#: not the three-corpus average, is what our perplexities and ratios compare with.
TABLE1_WIKI_PPL = TABLE1_PPL_BY_CORPUS["wikitext2"]
TABLE1_WIKI_REF = "HoC Table 1, Llama-3-8B, WikiText-2 column (4096-token windows)"
#: HoC Table 1, Llama-3-8B, WikiText-2: attacked / intact perplexity (104.57 / 5.75 = 18.2; 10.15 / 5.75 = 1.77).
TABLE1_WIKI_PPL_RATIO = {row: TABLE1_WIKI_PPL[row] / TABLE1_WIKI_PPL["base"] for row in ("zero_top5", "keep_top5")}

#: HoC Table 1, Llama-3-8B: the "Avg" perplexity column (mean of WikiText-2 / C4 / PG-19) and the five-task
#: zero-shot "Avg" accuracy (%: ARC-E, ARC-C, BoolQ, PIQA, WinoGrande), intact, top-5 zeroed, only the top-5 kept.
#: The accuracies are what our task averages compare with; the perplexities are NOT (three corpora, ours is one).
TABLE1 = {
    "ppl/base": 8.22, "ppl/zero_top5": 122.74, "ppl/keep_top5": 20.95,
    "acc/base": 73.0, "acc/zero_top5": 39.4, "acc/keep_top5": 71.0,
}
TABLE1_REF = "HoC Table 1, Llama-3-8B (Avg column: 5-task zero-shot acc %; ppl: mean of WikiText-2/C4/PG-19)"
#: HoC Table 1, Llama-3-8B: attacked / intact three-corpus average perplexity (122.74 / 8.22 = 14.9;
#: 20.95 / 8.22 = 2.55). Not comparable with a WikiText-only measurement: use ``TABLE1_WIKI_PPL_RATIO``. Kept only
#: until claims.yaml moves to ``TABLE1_WIKI_PPL_RATIO``.
TABLE1_PPL_RATIO = {row: TABLE1[f"ppl/{row}"] / TABLE1["ppl/base"] for row in ("zero_top5", "keep_top5")}
#: HoC Table 1, Llama-3-8B, Avg accuracy column: attacked minus intact, as a fraction ((39.4 - 73.0) / 100).
TABLE1_ACC_DELTA = {"zero_top5": round((TABLE1["acc/zero_top5"] - TABLE1["acc/base"]) / 100, 4)}

# --- HoC §3-4: MacDrop and its evaluation -----------------------------------------------------------------------------
#: HoC Alg. 1 / §4.1 main setting: MacDrop drops the top-5 massive rows of W_up and W_gate ...
MACDROP_K = 5
#: ... with the Step curriculum from p0 = 0.8 (HoC §4.1; Table 5, row Step, column p0 = 0.8: 76.5, the best).
MACDROP_P0 = 0.8
#: HoC §4.2 / Table 4: the robustness attack zeroes the top-3 massive rows of the fine-tuned model.
K_ATTACK = 3
#: HoC Table 5, rows Exp: alpha in {0.01, 0.05, 0.10}; alpha = 0.01 ties Step at p0 = 0.8 (76.5) ...
EXP_ALPHA = 0.01
#: ... per optimizer step, over the paper's T = 579 steps (HoC App. A: "3 epochs" = 579 steps; 49,402 training pairs
#: / batch 256 = 193 steps per epoch, house_of_cards.md §3.2).
T_STEPS = 579
#: HoC App. A Table 6: lr 1e-4, 3 epochs, LoRA/DoRA rank 16, alpha 16. The batch of 256 is derived, not printed:
#: per-device 8 x gradient accumulation 4 x 8 GPUs (house_of_cards.md §3.2 [mine]; it reproduces T = 579).
TABLE6 = {"lr": 1e-4, "epochs": 3, "batch_size": 256, "rank": 16, "alpha": 16}
#: HoC Table 3 (``acc``: fine-tuned, intact) and Table 4 (``acc_zero_top3``: the same models with the top-3 massive
#: rows zeroed), rows Llama-3-8B LoRA / +MacDrop / DoRA / +MacDrop, column Avg (5-task zero-shot mean, %).
TABLE34 = {
    "lora": {"acc": 76.0, "acc_zero_top3": 40.4},
    "lora_macdrop": {"acc": 76.5, "acc_zero_top3": 47.7},
    "dora": {"acc": 76.1, "acc_zero_top3": 40.3},
    "dora_macdrop": {"acc": 76.4, "acc_zero_top3": 72.7},
}
TABLE34_REF = "HoC Table 3 (acc) / Table 4 (acc_zero_top3), Llama-3-8B, 5-task average %"
#: HoC Table 3, Llama-3-8B, Avg: +MacDrop minus its adapter alone, as a fraction (LoRA 76.5 - 76.0 = +0.005; DoRA
#: 76.4 - 76.1 = +0.003; one seed each).
TABLE3_MACDROP_GAIN = {a: round((TABLE34[f"{a}_macdrop"]["acc"] - TABLE34[a]["acc"]) / 100, 4) for a in ("lora", "dora")}
#: HoC Table 4, Llama-3-8B, Avg under top-3 zeroing: +MacDrop minus its adapter alone, as a fraction (LoRA 47.7 -
#: 40.4 = +0.073; DoRA 72.7 - 40.3 = +0.324).
TABLE4_MACDROP_GAIN = {a: round((TABLE34[f"{a}_macdrop"]["acc_zero_top3"] - TABLE34[a]["acc_zero_top3"]) / 100, 4)
                       for a in ("lora", "dora")}
#: HoC App. F Table 8, column Avg (5-task zero-shot mean, %), Gemma-2 base models fine-tuned with LoRA and
#: LoRA + MacDrop: the models the paper calls insensitive to their massive weights (HoC Fig. 4, App. F). The paper
#: reports no held-out loss for them. Means recomputed from the five task columns agree (house_of_cards.md §3.4).
TABLE8_GEMMA2 = {
    "gemma-2-2b": {"lora": 72.7, "lora_macdrop": 72.6, "dora": 72.6, "dora_macdrop": 72.6},
    "gemma-2-9b": {"lora": 80.6, "lora_macdrop": 80.4, "dora": 80.6, "dora_macdrop": 80.5},
    "gemma-2-27b": {"lora": 81.4, "lora_macdrop": 81.4, "dora": 81.6, "dora_macdrop": 81.5},
}
#: HoC Table 8, Gemma-2: LoRA + MacDrop minus LoRA, Avg accuracy as a fraction (2b: 72.6 - 72.7 = -0.001).
TABLE8_GEMMA2_MACDROP_GAIN = {m: round((r["lora_macdrop"] - r["lora"]) / 100, 4) for m, r in TABLE8_GEMMA2.items()}


def table6_note() -> str:
    """HoC App. A Table 6 in words, for the note of notebook 03's settings record."""
    t = TABLE6
    return (f"HoC App. A Table 6: lr {t['lr']:.0e}".replace("e-0", "e-")
            + f", {t['epochs']} epochs, batch {t['batch_size']}, r{t['rank']} a{t['alpha']}")
