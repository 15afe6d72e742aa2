"""Inheritune's paper numbers (Sanyal et al., *Inheritune*, arXiv 2404.08634 v4; v2 numbers identical), each with
its exact source. The library, the notebooks and ``claims.yaml`` (``"inheritune.paper:NAME[.key]"``) read them from
here. Transcribed from the research note ``inheritune.md`` (§1.6 figures, §3.1 Table 5, §3.4 Table 4 / Fig. 3);
derived values are computed here, never typed.

All models are the authors' own GPT-2s trained on OpenWebText (not OpenAI's checkpoints). Validation losses are
nats per token on OpenWebText's validation split, final step, truncated to 2 decimals by the paper. Layers are
0-based in our lists (the paper's are 1-based). Curves read off images carry the reading error noted.

Depth matters: our Inheritune target is always half the reference's depth (``inherit_first``), and so is every
comparison the claims make. Table 5's GPT-2 medium row reaches the reference only after growing to 16 of 24 layers
(two-thirds depth); its half-depth (12-layer) value is round 1, and Table 5 has no 12-layer from-scratch run.
"""

from __future__ import annotations

# Inheritune v4 Fig. 1 (MaxRank per layer, tau = 0.9), the authors' self-trained OpenWebText GPT-2 medium (24L) and
# large (36L), 100K steps; read off the authors' repository images images/med_rank_analysis.png and
# large_rank_analysis.png (inheritune.md §1.6; v2-era figures, +-0.3 rank by eye). The images start at 1-based
# layer 3, so the first two entries are None.
MAXRANK = {
    "gpt2-medium": [None, None, 1.7, 6.2, 5.8, 33.6, 1.0, 8.5, 8.5, 6.4, 3.1, 1.2, 1.7, 2.7, 1.9, 1.0, 1.6, 1.0, 1.0,
                    1.2, 1.1, 1.7, 1.0, 1.0],
    "gpt2-large": [None, None, 1.5, 4.0, 2.7, 1.7, 2.3, 1.05, 1.0, 24.4, 3.6, 5.8, 1.2, 5.3, 3.5, 4.7, 1.4, 2.0, 2.0,
                   1.0, 1.6, 1.2, 1.1, 1.2, 1.15, 1.05, 1.2, 1.0, 1.4, 1.0, 2.0, 1.0, 1.0, 1.3, 1.4, 1.4],
}

# Inheritune v4 Fig. 14 (AvgMass per layer, eta = 0.9), the same self-trained GPT-2 medium / large, read off the
# authors' images images/mediumfull_mass_analysis.png / largefull_mass_analysis.png (+-0.5 columns by eye).
AVGMASS = {
    "gpt2-medium": [20.3, 19.4, 29.8, 28.8, 9.0, 3.4, 3.9, 8.4, 8.1, 4.4, 6.7, 2.4, 1.6, 2.0, 1.4, 4.4, 1.3, 1.1, 2.3,
                    1.4, 1.2, 1.3, 1.6, 3.6],
    "gpt2-large": [18.6, 12.6, 20.8, 23.9, 14.0, 6.0, 5.7, 2.6, 3.8, 4.0, 7.9, 7.1, 6.7, 8.0, 1.8, 2.2, 2.7, 1.7, 1.7,
                   1.6, 1.9, 1.15, 1.1, 1.1, 1.35, 1.05, 1.1, 1.05, 1.3, 1.0, 1.1, 1.05, 1.0, 1.3, 2.4, 3.4],
}


def _thirds(values: list[float]) -> list[float]:
    """Means over the first, middle and last third of a per-layer list (the first ``len % 3`` parts one longer:
    ``torch.tensor_split``'s split, the one ``inheritune.attention.depth_thirds`` applies to our models)."""
    n, k = len(values), len(values) // 3
    sizes = [k + (1 if i < n % 3 else 0) for i in range(3)]
    starts = [sum(sizes[:i]) for i in range(3)]
    return [sum(values[s:s + m]) / m for s, m in zip(starts, sizes, strict=True)]


# Inheritune v4 Fig. 14: AvgMass over the last third of the layers / over the first third, computed from ``AVGMASS``
# the way our ``attn/avgmass_last_over_first_third`` is (GPT-2 medium: 1.73 / 15.4 = 0.11; large: 0.13).
AVGMASS_LAST_OVER_FIRST_THIRD_BY_MODEL = {m: _thirds(v)[2] / _thirds(v)[0] for m, v in AVGMASS.items()}
AVGMASS_LAST_OVER_FIRST_THIRD = AVGMASS_LAST_OVER_FIRST_THIRD_BY_MODEL["gpt2-medium"]

# Lazy layers in our units (decision D12: MaxRank < 2, counted over all layers the Fig. 1 image shows, i.e. 1-based
# layers 3-24 / 3-36), computed from ``MAXRANK``: GPT-2 medium 14 (11 of its last 12 layers), large 22. Values near
# 2 (1.7, 1.9) are within the +-0.3 reading error.
N_LAZY_LAYERS = {m: sum(1 for v in r if v is not None and v < 2) for m, r in MAXRANK.items()}
# Inheritune v4 Fig. 1: the smallest MaxRank among the second half of the layers (0-based L // 2 .. L - 1, what our
# ``attn/min_maxrank_second_half`` reads), from ``MAXRANK``: 1.0 for GPT-2 medium (layers 13-24) and large (19-36),
# i.e. lazy (Def. G.1: MaxRank = 1).
MIN_MAXRANK_SECOND_HALF = {m: min(r[len(r) // 2:]) for m, r in MAXRANK.items()}
# Inheritune v4 §4 / Fig. 8 text, GPT-2 medium 24L reference: "3 out of the last 12 later layers exhibit rank-1"
# (the strict, rank exactly 1 reading of the v4 figure; the v2-era Fig. 1 image shows 5 of the last 12 at 1.0).
LAZY_LAST12_TEXT = {"gpt2-medium": 3}

# Inheritune v4 Table 5 (= v2 Table 1): OpenWebText validation loss after the given steps (thousands), keyed
# "<model>/<layers>L/<init>/<steps>k"; init "random" = from scratch, "inheritune" = the first l reference layers
# (medium: rounds 1-3 at 12, 14, 16 layers; large and XL: one round at half depth). inheritune.md §3.1.
TABLE5 = {
    "gpt2-medium/24L/random/100k": 2.81, "gpt2-medium/16L/random/100k": 2.86, "gpt2-medium/16L/random/200k": 2.83,
    "gpt2-medium/12L/inheritune/100k": 2.87, "gpt2-medium/14L/inheritune/100k": 2.84,
    "gpt2-medium/16L/inheritune/100k": 2.81,
    "gpt2-large/36L/random/100k": 2.85, "gpt2-large/18L/random/100k": 2.97, "gpt2-large/18L/random/200k": 2.84,
    "gpt2-large/18L/inheritune/100k": 2.80,
    "gpt2-xl/48L/random/100k": 2.65, "gpt2-xl/24L/random/100k": 2.69, "gpt2-xl/24L/random/200k": 2.62,
    "gpt2-xl/24L/inheritune/100k": 2.64,
}
FULL_DEPTH = {"gpt2-medium": 24, "gpt2-large": 36, "gpt2-xl": 48}


def _diff(a: str, b: str) -> float | None:
    """Table 5 row ``a`` minus row ``b`` (2 decimals: the table's precision), None where either row is absent."""
    return round(TABLE5[a] - TABLE5[b], 2) if a in TABLE5 and b in TABLE5 else None


def _half(model: str, init: str, steps: str) -> str:
    return f"{model}/{FULL_DEPTH[model] // 2}L/{init}/{steps}"


# Inheritune v4 Table 5, half depth: the Inheritune model of half the reference's depth (100K steps) minus the full
# reference (100K steps). Medium 12L round 1 2.87 - 24L 2.81 = +0.06 (it needed two more rounds); large 18L 2.80 -
# 36L 2.85 = -0.05; XL 24L 2.64 - 48L 2.65 = -0.01.
HALF_DEPTH_MINUS_REFERENCE = {m: _diff(_half(m, "inheritune", "100k"), f"{m}/{n}L/random/100k")
                              for m, n in FULL_DEPTH.items()}
# Inheritune v4 Table 5, half depth, equal steps: Inheritune minus the same depth from scratch (both 100K steps).
# Large 2.80 - 2.97 = -0.17; XL 2.64 - 2.69 = -0.05; medium None (Table 5 has no 12L from-scratch run).
HALF_DEPTH_MINUS_RANDOM = {m: _diff(_half(m, "inheritune", "100k"), _half(m, "random", "100k")) for m in FULL_DEPTH}
# Inheritune v4 Table 5, half depth, equal steps: from scratch minus the full reference (the gap "matches the reference"
# closes). Large 18L 2.97 - 36L 2.85 = +0.12; XL 24L 2.69 - 48L 2.65 = +0.04; medium None (no 12L run; its 16L: +0.05).
HALF_DEPTH_RANDOM_MINUS_REFERENCE = {m: _diff(_half(m, "random", "100k"), f"{m}/{n}L/random/100k")
                                     for m, n in FULL_DEPTH.items()}
# Inheritune v4 Table 5 / Fig. 6, half depth: Inheritune at 100K steps minus the same depth from scratch at 200K.
# Large 2.80 - 2.84 = -0.04; XL 2.64 - 2.62 = +0.02; medium None (no 12L run at 200K steps).
HALF_DEPTH_MINUS_RANDOM_2X = {m: _diff(_half(m, "inheritune", "100k"), _half(m, "random", "200k"))
                              for m in FULL_DEPTH}

# What claims.yaml reads (our inherit_first is always the half-depth model):
# GPT-2 medium, Table 5: 12L Inheritune round 1 (2.87) minus the 24L reference (2.81) = +0.06.
INHERIT_FIRST_MINUS_REFERENCE = HALF_DEPTH_MINUS_REFERENCE["gpt2-medium"]
# GPT-2 large, Table 5: 18L Inheritune at 100K (2.80) minus 18L from scratch at 200K (2.84) = -0.04. GPT-2 medium has
# no half-depth run at 200K steps, so the half-depth value comes from large (of 36 layers).
INHERIT_FIRST_MINUS_RANDOM_2X = HALF_DEPTH_MINUS_RANDOM_2X["gpt2-large"]
# Not half depth: GPT-2 medium, Table 5, the grown 16L model (round 3, two-thirds depth) minus the 24L reference
# (2.81 - 2.81 = 0.00) and minus 16L from scratch at 200K steps (2.81 - 2.83 = -0.02).
GROWN_MINUS_REFERENCE = _diff("gpt2-medium/16L/inheritune/100k", "gpt2-medium/24L/random/100k")
GROWN_MINUS_RANDOM_2X = _diff("gpt2-medium/16L/inheritune/100k", "gpt2-medium/16L/random/200k")

# Inheritune v4 Table 5, GPT-2 medium: validation loss of the growth rounds 12L, 14L, 16L (the 24L reference: 2.81).
GROWTH_VAL_LOSS = [TABLE5[f"gpt2-medium/{n}L/inheritune/100k"] for n in (12, 14, 16)]
GROWTH_VAL_LOSS_REF = "Inheritune Table 5: GPT-2 medium rounds 12L, 14L, 16L vs 24L 2.81"

# Inheritune v4 Fig. 3 (= v2 Fig. 1 c, f), validation loss at 10K steps of half-depth models initialised from the
# reference's last (lazy) half, from its first half, or at random; read off images/medium_later_lyrs.png and
# large_later_lyrs.png (inheritune.md §3.4, +-0.02 by eye). The only half-depth from-scratch numbers for medium.
FIG3_VAL_LOSS_10K = {
    "gpt2-medium": {"inherit_last": 3.34, "random": 3.36, "inherit_first": 3.09},   # 12 of 24 layers
    "gpt2-large": {"inherit_last": 3.55, "random": 3.59, "inherit_first": 3.16},    # 18 of 36 layers
}
# Fig. 3 at 10K steps: last half minus random (medium -0.02, large -0.04) and first half minus random (-0.27, -0.43).
FIG3_LAST_MINUS_RANDOM_10K = {m: round(v["inherit_last"] - v["random"], 2) for m, v in FIG3_VAL_LOSS_10K.items()}
FIG3_FIRST_MINUS_RANDOM_10K = {m: round(v["inherit_first"] - v["random"], 2) for m, v in FIG3_VAL_LOSS_10K.items()}
# Fig. 3 at 10K steps: last half minus first half (medium 3.34 - 3.09 = +0.25, large 3.55 - 3.16 = +0.39).
FIG3_LAST_MINUS_FIRST_10K = {m: round(v["inherit_last"] - v["inherit_first"], 2) for m, v in FIG3_VAL_LOSS_10K.items()}

# Inheritune v4 Table 4 (inheritune.md §3.4): GPT-2 small, a 12L reference (100K steps), 4L models initialised from
# reference layers 1-4 / 5-8 / 9-12 (1-based) or at random, each trained 100K steps: validation loss, and the AvgRank
# of the source layers (Fig. 2).
TABLE4_VAL_LOSS = {"random": 3.25, "layers_1_4": 3.22, "layers_5_8": 3.19, "layers_9_12": 3.23}
TABLE4_SOURCE_AVGRANK = {"layers_1_4": 8.40, "layers_5_8": 9.48, "layers_9_12": 1.22}
# Table 4 differences in our variants' terms: middle (5-8) minus first (1-4) = -0.03; last (9-12, lazy) minus first
# = +0.01; last minus random = -0.02; first minus random = -0.03.
TABLE4_DIFF = {
    "inherit_middle-inherit_first": round(TABLE4_VAL_LOSS["layers_5_8"] - TABLE4_VAL_LOSS["layers_1_4"], 2),
    "inherit_last-inherit_first": round(TABLE4_VAL_LOSS["layers_9_12"] - TABLE4_VAL_LOSS["layers_1_4"], 2),
    "inherit_last-random": round(TABLE4_VAL_LOSS["layers_9_12"] - TABLE4_VAL_LOSS["random"], 2),
    "inherit_first-random": round(TABLE4_VAL_LOSS["layers_1_4"] - TABLE4_VAL_LOSS["random"], 2),
}

# Validation loss beside each of our variants' ``val_loss`` -> (value, where from): the paper's GPT-2 medium run of
# the same construction (half depth, 100K steps; the reference at full depth), else None with the nearest numbers.
VAL_LOSS = {
    "reference": (TABLE5["gpt2-medium/24L/random/100k"], "Table 5: GPT-2 medium 24L from scratch, 100K steps"),
    "inherit_first": (TABLE5["gpt2-medium/12L/inheritune/100k"],
                      "Table 5: GPT-2 medium 12L (half depth) Inheritune round 1, 100K steps"),
    "random": (None, "Table 5 has no GPT-2 medium 12L from-scratch run (16L: 2.86; large 18L: 2.97); "
                     "Fig. 3 at 10K steps: 12L random 3.36 vs first half 3.09"),
    "random_2x": (None, "Table 5 has no GPT-2 medium 12L run at 200K steps (16L: 2.83; large 18L: 2.84)"),
    "inherit_last": (None, "no 100K-step value; Fig. 3 at 10K steps: GPT-2 medium 12L from the last (lazy) half "
                           "3.34, random 3.36, first half 3.09"),
    "inherit_middle": (None, "no GPT-2 medium value; Table 4 (GPT-2 small, 4 of 12 layers, 100K steps): layers 5-8 "
                             "3.19, 1-4 3.22, 9-12 3.23, random 3.25"),
}
