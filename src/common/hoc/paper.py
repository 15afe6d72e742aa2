"""The paper numbers of House of Cards (Oh et al., arXiv 2410.01866 v2) and of the papers it builds on: Sun et al.,
"Massive activations" (SunMA, arXiv 2402.17762) and Yu et al., "The super weight" (arXiv 2411.07191).

One place for every number the library, notebooks 01-03 and ``claims.yaml`` compare against (claims write
``paper_value: "hoc.paper:NAME[.key...]"``). Each constant names its exact source. Units are ours: layer and
channel indices 0-based (the papers print 1-based layers), accuracies as printed (%) unless said otherwise.
"""

from __future__ import annotations

# --- SunMA §2.2: the massive-activation criterion (HoC §2.2 applies it to the FFN intermediate state) -------------
#: SunMA §2.2: a massive activation has |x| >= 100 ...
SUN_MIN_ABS = 100.0
#: ... and |x| >= 1000x the median |x| of its tensor (SunMA §2.2).
SUN_MIN_RATIO = 1000.0
#: SunMA §2.2, Fig. 1, Llama-2-7B: top activation ~2,500 vs median ~0.2, i.e. >10,000x (read as 12,500).
SUN_TOP_RATIO = 12500
#: SunMA Table 3, Llama-2-7B, WikiText-2: perplexity 5.47 -> 5.47 with the massive activations set to their mean
#: (ratio to the intact model).
SUN_MEAN_PPL_RATIO = 1.0

# --- HoC Table 7 (and SunMA §2): massive layer, massive hidden dims and top-5 intermediate channels ---------------
#: HoC Table 7 / SunMA §2, per paper model, 0-based layer indices (the papers print layer 2 / 4).
TABLE7 = {
    "llama-2-7b": {"layer": 1, "hidden_dims": [1415, 2533], "channels": [7890, 10411, 1192, 8731, 5843]},
    "llama-2-13b": {"layer": 3, "hidden_dims": [2100, 4743], "channels": [7678, 8811, 11371, 6619, 12281]},
    "llama-3-8b": {"layer": 1, "hidden_dims": [788, 1384, 4062], "channels": [2427, 198, 6412, 12657, 591]},
    "mistral-7b": {"layer": 1, "hidden_dims": [2070], "channels": [7310, 8572, 2514, 1878, 8693]},
}
TABLE7_REF = "HoC Table 7 / SunMA §2 (paper layers are 1-based)"
#: HoC §2.3: with a BOS token position 0 is the same token for every prompt, so the position-0 state (and the
#: massive weights found from it) does not change with the prompt (Llama-3-8B): relative spread 0.
BOS_PROMPT_SPREAD = 0

# --- HoC Table 1: the massive-weight attack on Llama-3-8B, k = 5 ----------------------------------------------------
#: HoC Table 1, Llama-3-8B, k = 5: perplexity (mean of WikiText-2 / C4 / PG-19) and the five-task zero-shot average
#: accuracy (%: ARC-E/C, BoolQ, PIQA, WinoGrande) intact, with the top-5 rows zeroed, and with only them kept.
TABLE1 = {
    "ppl/base": 8.22, "ppl/zero_top5": 122.74, "ppl/keep_top5": 20.95,
    "acc/base": 73.0, "acc/zero_top5": 39.4, "acc/keep_top5": 71.0,
}
TABLE1_REF = "HoC Table 1, Llama-3-8B (avg of WikiText-2/C4/PG-19 ppl; 5-task acc %)"
#: HoC Table 1, Llama-3-8B: attacked / intact perplexity (122.74 / 8.22 and 20.95 / 8.22, as rounded in claims.yaml).
TABLE1_PPL_RATIO = {"zero_top5": 14.93, "keep_top5": 2.549}
#: HoC Table 1, Llama-3-8B: attacked minus intact 5-task accuracy as a fraction ((39.4 - 73.0) / 100).
TABLE1_ACC_DELTA = {"zero_top5": -0.336}

# --- HoC §3-4: MacDrop and its evaluation -----------------------------------------------------------------------------
#: HoC Alg. 1 and Table 3's main setting: MacDrop drops the top-5 massive rows ...
MACDROP_K = 5
#: ... with the Step curriculum from p0 = 0.8 (HoC Table 3, Table 5's main row).
MACDROP_P0 = 0.8
#: HoC Table 4: the robustness attack zeroes the top-3 massive rows of the fine-tuned model.
K_ATTACK = 3
#: HoC Table 5 (research §3.5): the Exp curriculum's alpha = 0.01 ...
EXP_ALPHA = 0.01
#: ... at T = 579 optimizer steps (HoC App. A: 49k pairs, 3 epochs at batch 256).
T_STEPS = 579
#: HoC App. A Table 6: the fine-tuning hyper-parameters (LoRA/DoRA r16 alpha16, lr 1e-4, 3 epochs, batch 256).
TABLE6 = {"lr": 1e-4, "epochs": 3, "batch_size": 256, "rank": 16, "alpha": 16}
#: HoC Table 3 (acc: intact) and Table 4 (acc_zero_top3: top-3 rows zeroed), Llama-3-8B, five-task average %.
TABLE34 = {
    "lora": {"acc": 76.0, "acc_zero_top3": 40.4},
    "lora_macdrop": {"acc": 76.5, "acc_zero_top3": 47.7},
    "dora": {"acc": 76.1, "acc_zero_top3": 40.3},
    "dora_macdrop": {"acc": 76.4, "acc_zero_top3": 72.7},
}
TABLE34_REF = "HoC Table 3 (acc) / Table 4 (acc_zero_top3), Llama-3-8B, 5-task average %"


def table6_note() -> str:
    """HoC App. A Table 6 in words, for the note of notebook 03's settings record."""
    t = TABLE6
    return (f"HoC App. A Table 6: lr {t['lr']:.0e}".replace("e-0", "e-")
            + f", {t['epochs']} epochs, batch {t['batch_size']}, r{t['rank']} a{t['alpha']}")
