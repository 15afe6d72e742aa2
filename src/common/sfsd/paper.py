"""SFSD's paper numbers (Chavan, Lele & Gupta, *Surgical Feature-Space Decomposition of LLMs*, arXiv 2405.13039,
ACL 2024), each with its exact source. The library, the notebooks and ``claims.yaml`` (``"sfsd.paper:NAME[.key]"``)
read them from here.

Source: the paper body could not be read offline (research sfsd.md §0); every number comes from the result tables
the authors reproduce in their repository README (nyunAI/SFSD-LLM, HEAD 2968751), transcribed in sfsd.md §3.
Models: LLaMA-7B (huggyllama/llama-7b, LLaMA-1, 6,738,415,616 parameters) and Mistral-7B-v0.1 (7,241,732,096).
Accuracies: 0-shot, legacy lm-eval, acc_norm for PIQA / HellaSwag / ARC, acc for BoolQ / WinoGrande, in % as
printed. Perplexity: WikiText-2 at sequence length 128 (LLM-Pruner protocol).

Budgets: the paper's budgets are shares of the WHOLE model's parameters (embeddings and lm_head included). Ours
(``M/lowrank/<pct>/...``) are ranks as a share of kappa = mn/(m+n) in every decomposed module, which is the module's
parameter share, not the model's: on SmolLM2-135M 80% / 50% of kappa are 86% / 66% of the whole model
(``M/lowrank/<pct>/whole_model_pct``). Derived values are computed here, never typed.
"""

from __future__ import annotations

LLAMA_7B_PARAMS = 6_738_415_616
MISTRAL_7B_PARAMS = 7_241_732_096
# One decoder layer (q, k, v, o, gate, up, down and the two RMSNorm weights): LLaMA-7B d 4096, ffn 11008, 32 heads;
# Mistral-7B d 4096, ffn 14336, k/v 1024 wide (sfsd.md §1.6, §1.9).
LLAMA_7B_LAYER_PARAMS = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
MISTRAL_7B_LAYER_PARAMS = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096

# SFSD README Table A ("Results for Uniform Sparsity"; paper RQ1), LLaMA-7B, column Avg (mean of BoolQ, PIQA,
# HellaSwag, WinoGrande, ARC-e, ARC-c, %): dense, and feature space (SFSD) / weight space (SVD) at 5.4B and 3.4B
# parameters. The keys' 80 / 50 are the WHOLE-MODEL budget (5.4B / 6.74B = 80%, 3.4B / 6.74B = 50%), not a fraction
# of kappa. Two values are the mean of the row's six task columns, because the README's own Avg cell disagrees with
# its row: feature@5.4B prints 64.68 (row mean 64.85), weight SVD@3.4B prints 41.10 (row mean 41.04).
TABLE_A = {"dense": 69.61, ("feature", 80): 64.85, ("weight_svd", 80): 50.41, ("feature", 50): 47.26,
           ("weight_svd", 50): 41.04}
TABLE_A_README_AVG = {("feature", 80): 64.68, ("weight_svd", 50): 41.10}
TABLE_A_REF = "SFSD Table A (LLaMA-7B; 80% / 50% = 5.4B / 3.4B of the whole model's parameters, not of kappa)"
# SFSD Table A's "#Params (B)" column, and the whole-model share it is (80.1% and 50.5% of 6.74B).
TABLE_A_PARAMS_B = {80: 5.4, 50: 3.4}
TABLE_A_WHOLE_MODEL_PCT = {p: 100 * b * 1e9 / LLAMA_7B_PARAMS for p, b in TABLE_A_PARAMS_B.items()}
# The per-module rank fraction of kappa Table A would need IF it decomposed all 7 modules of layers 4-31 (the
# searches' subset; the README does not say which subset it used, sfsd.md §1.6 / D4): 1 - removed / (28 layers).
# About 0.76 at 5.4B and 0.41 at 3.4B (the budgets are rounded to 0.1B: +-0.01).
TABLE_A_KAPPA_FRACTION_IF_LAYERS_4_31 = {
    p: 1 - (LLAMA_7B_PARAMS - b * 1e9) / (28 * LLAMA_7B_LAYER_PARAMS) for p, b in TABLE_A_PARAMS_B.items()}
# SFSD Table A, LLaMA-7B: feature-space minus weight-space average accuracy at the same whole-model budget, as a
# fraction: 5.4B (80%): (64.85 - 50.41) / 100 = +0.144; 3.4B (50%): (47.26 - 41.04) / 100 = +0.062.
TABLE_A_FEATURE_MINUS_SVD = {f"whole{p}": round((TABLE_A[("feature", p)] - TABLE_A[("weight_svd", p)]) / 100, 4)
                             for p in (80, 50)}

# SFSD README Table C ("Perplexity Based Surgical Rank Search"): WikiText-2 perplexity at sequence length 128 on
# the test rows the search does not see (rows 871-4357 of wikitext-2-raw-v1 test), and the 6-task average
# accuracy (%, full eval sets), at each whole-model budget (%) the search passed: LLaMA-7B and Mistral-7B.
TABLE_C = {
    "llama-7b": {"budget": [100, 94, 87, 83, 79, 75, 70],
                 "ppl": [12.33, 15.07, 18.29, 22.23, 27.20, 33.57, 40.82],
                 "avg": [69.61, 68.04, 66.79, 65.78, 63.68, 59.67, 55.92]},
    "mistral-7b": {"budget": [100, 97, 93, 90, 87, 83, 80],
                   "ppl": [11.60, 13.90, 15.56, 17.91, 20.68, 23.96, 27.49],
                   "avg": [75.46, 74.69, 73.27, 72.21, 69.48, 65.56, 63.60]},
}
# The search's bound (released perplexity_test.py): accept a rank while search-split ppl <= dense ppl x t^m after m
# visited modules, t = 1.005 (Mistral). The README columns sit after m = 29, 57, 85, 113, 141, 169 modules (sfsd.md
# §1.8, derived); LLaMA's ratios fit t = 1.007, not the released 1.005.
TABLE_C_MODULES = [0, 29, 57, 85, 113, 141, 169]
TABLE_C_TOLERANCE = {"llama-7b": 1.007, "mistral-7b": 1.005}
# Table C perplexity / dense perplexity, and the same over the bound t^m (1.0 = the search ends right at its bound):
# Mistral 1.198 / 1.156 ... 2.370 / 2.323, i.e. 1-4% above the bound (the bound is on the search split, these are
# test rows); LLaMA vs 1.007^m within 1-2%.
TABLE_C_PPL_RATIO = {m: [p / v["ppl"][0] for p in v["ppl"]] for m, v in TABLE_C.items()}
TABLE_C_PPL_OVER_BOUND = {m: [r / TABLE_C_TOLERANCE[m] ** n for r, n in zip(TABLE_C_PPL_RATIO[m], TABLE_C_MODULES,
                                                                               strict=True)]
                          for m in TABLE_C}

# SFSD README Table C, budget 100%: dense LLaMA-7B perplexity on WikiText-2 at sequence length 128 (test rows
# 871-4357; Mistral-7B: 11.60).
DENSE_PPL = TABLE_C["llama-7b"]["ppl"][0]
DENSE_PPL_BY_MODEL = {m: v["ppl"][0] for m, v in TABLE_C.items()}
DENSE_PPL_REF = "SFSD Table C, budget 100% (LLaMA-7B, WikiText-2 seq 128, test rows)"

# SFSD README Table B ("Task Specific Rank Search"): per task, the dense accuracy on the 80% test split, then
# (test-split accuracy %, whole-model budget %) after compressing the last 35 / 70 / 140 modules (= last 5 / 10 /
# 20 layers x 7 modules), searched on the other 20% with delta = 0 (sfsd.md §3.3).
TABLE_B = {
    "llama-7b": {
        "piqa": (78.23, [(77.21, 96), (76.60, 93), (75.78, 89)]),
        "boolq": (75.56, [(75.03, 90), (74.80, 84), (73.50, 76)]),
        "arc_challenge": (44.82, [(43.86, 94), (41.73, 90), (42.16, 86)]),
        "arc_easy": (72.21, [(70.32, 93), (69.26, 87), (67.68, 84)]),
        "winogrande": (70.09, [(69.50, 90), (69.79, 80), (62.69, 71)]),
        "hellaswag": (75.89, [(75.60, 97), (75.23, 95), (74.83, 93)]),
    },
    "mistral-7b": {
        "piqa": (80.27, [(80.14, 97), (78.84, 95), (78.57, 90)]),
        "boolq": (83.79, [(84.17, 99), (83.94, 97), (83.98, 94)]),
        "arc_challenge": (54.64, [(47.07, 88), (45.35, 85), (43.54, 83)]),
        "arc_easy": (79.11, [(78.68, 92), (77.32, 90), (77.21, 88)]),
        "winogrande": (73.35, [(74.43, 96), (73.15, 94), (72.26, 91)]),
        "hellaswag": (80.85, [(79.36, 96), (79.24, 96), (79.00, 95)]),
    },
}
TABLE_B_MODULES = [35, 70, 140]
_LAYER_SHARE = {"llama-7b": 100 * LLAMA_7B_LAYER_PARAMS / LLAMA_7B_PARAMS,        # 3.00% of the model per layer
                "mistral-7b": 100 * MISTRAL_7B_LAYER_PARAMS / MISTRAL_7B_PARAMS}  # 3.01%


def _segment_removed(model: str, budgets: list[int]) -> dict[str, float]:
    """Share of the parameters removed in layers 27-31, 22-26 and 12-21 (1-based 28-32, 23-27, 13-22), from the drop
    of the whole-model budget between Table B's columns (budgets rounded to 1%: +-0.07 for a 5-layer segment)."""
    b0, b35, b70, b140 = 100, *budgets
    share = _LAYER_SHARE[model]
    return {"layers_27_31": (b0 - b35) / (5 * share), "layers_22_26": (b35 - b70) / (5 * share),
            "layers_12_21": (b70 - b140) / (10 * share)}


# SFSD Table B, derived: parameter share removed per layer segment (LLaMA-7B: layers 27-31 take 20-67%, layers 12-21
# 7-30%, per task), and the kept rank fraction of the last 5 layers minus that of layers 12-21 (= removed(12-21) -
# removed(27-31); a rank fraction of kappa is the module's parameter share), the paper's nearest reading of our
# ``search/last_minus_first_third``: LLaMA-7B PIQA -0.13, BoolQ -0.40, ARC-C -0.27, ARC-E -0.37, WG -0.37, HS -0.13.
TABLE_B_SEGMENT_REMOVED = {m: {t: _segment_removed(m, [b for _, b in cols]) for t, (_, cols) in tasks.items()}
                           for m, tasks in TABLE_B.items()}
TABLE_B_KEPT_LAST5_MINUS_MID10 = {m: {t: s["layers_12_21"] - s["layers_27_31"] for t, s in tasks.items()}
                                  for m, tasks in TABLE_B_SEGMENT_REMOVED.items()}

# SFSD README Table B, LLaMA-7B, row PIQA: test-split accuracy after the last 35 modules are searched minus the dense
# model's on the same split, as a fraction: (77.21 - 78.23) / 100 = -0.0102, at a 96% whole-model budget.
TASK_SEARCH_TEST_MINUS_DENSE = round((TABLE_B["llama-7b"]["piqa"][1][0][0] - TABLE_B["llama-7b"]["piqa"][0]) / 100, 4)
TASK_SEARCH_REF = "SFSD Table B (LLaMA-7B PIQA, 35 modules: 77.21 vs 78.23 on the 80% test split, 96% budget)"
