"""Inheritune's paper numbers (Sanyal et al., *Inheritune*, arXiv 2404.08634 v4; v2 numbers identical), each with
its exact source. The library, the notebooks and ``claims.yaml`` (``"inheritune.paper:NAME"``) read them from here.

Layers are 0-based in our lists (the paper's are 1-based). Curves read off images carry the reading error noted.
"""

from __future__ import annotations

# Inheritune v4 Fig. 1 (MaxRank per layer, tau = 0.9), the authors' self-trained OpenWebText GPT-2 medium (24L) and
# large (36L), 100K steps; read off the authors' repository images (inheritune.md §1.6; v2-era figures, +-0.3 rank
# by eye). The images start at 1-based layer 3, so the first two entries are None.
MAXRANK = {
    "gpt2-medium": [None, None, 1.7, 6.2, 5.8, 33.6, 1.0, 8.5, 8.5, 6.4, 3.1, 1.2, 1.7, 2.7, 1.9, 1.0, 1.6, 1.0, 1.0,
                    1.2, 1.1, 1.7, 1.0, 1.0],
    "gpt2-large": [None, None, 1.5, 4.0, 2.7, 1.7, 2.3, 1.05, 1.0, 24.4, 3.6, 5.8, 1.2, 5.3, 3.5, 4.7, 1.4, 2.0, 2.0,
                   1.0, 1.6, 1.2, 1.1, 1.2, 1.15, 1.05, 1.2, 1.0, 1.4, 1.0, 2.0, 1.0, 1.0, 1.3, 1.4, 1.4],
}

# Inheritune v4 Fig. 14 (AvgMass per layer, eta = 0.9), the same self-trained GPT-2 medium / large, read off the
# authors' images (+-0.5 mass by eye).
AVGMASS = {
    "gpt2-medium": [20.3, 19.4, 29.8, 28.8, 9.0, 3.4, 3.9, 8.4, 8.1, 4.4, 6.7, 2.4, 1.6, 2.0, 1.4, 4.4, 1.3, 1.1, 2.3,
                    1.4, 1.2, 1.3, 1.6, 3.6],
    "gpt2-large": [18.6, 12.6, 20.8, 23.9, 14.0, 6.0, 5.7, 2.6, 3.8, 4.0, 7.9, 7.1, 6.7, 8.0, 1.8, 2.2, 2.7, 1.7, 1.7,
                   1.6, 1.9, 1.15, 1.1, 1.1, 1.35, 1.05, 1.1, 1.05, 1.3, 1.0, 1.1, 1.05, 1.0, 1.3, 2.4, 3.4],
}

# Inheritune v4 Fig. 14, GPT-2 medium: AvgMass over the last third of the layers / over the first third (first
# third ~15 columns, last third ~1.7, read off the figure).
AVGMASS_LAST_OVER_FIRST_THIRD = 0.11

# Validation loss (nats per token, OpenWebText) of the run closest to each of our variants -> (value, where from).
# Table 5 and Fig. 3: GPT-2 medium, 100K steps unless said; Table 4: GPT-2 small (inheritune.md §3).
VAL_LOSS = {
    "reference": (2.81, "Table 5: GPT-2 medium 24L from scratch, 100K steps"),
    "inherit_first": (2.87, "Table 5: GPT-2 medium 12L Inheritune round 1 (round 3, 16L: 2.81)"),
    "random": (2.86, "Table 5: GPT-2 medium 16L from scratch, 100K steps"),
    "random_2x": (2.83, "Table 5: GPT-2 medium 16L from scratch, 200K steps"),
    "inherit_last": (3.34, "Fig. 3: GPT-2 medium 12L from the last (lazy) half at 10K steps; random 3.36, first half 3.09"),
    "inherit_middle": (3.19, "Table 4: GPT-2 small 4L from layers 5-8 (random 3.25, 1-4 3.22, 9-12 3.23)"),
}

# Inheritune v4 Table 5, GPT-2 medium: validation loss of the growth rounds 12L, 14L, 16L (the 24L reference: 2.81).
GROWTH_VAL_LOSS = [2.87, 2.84, 2.81]
GROWTH_VAL_LOSS_REF = "Inheritune Table 5: GPT-2 medium rounds 12L, 14L, 16L vs 24L 2.81"

# Inheritune v4 Table 5, GPT-2 medium: Inheritune (16L after round 3, 2.81) minus the 24L reference (2.81).
INHERIT_FIRST_MINUS_REFERENCE = 0.0

# Inheritune v4 Table 5 / Fig. 6, GPT-2 medium: Inheritune 16L at 100K steps (2.81) minus random init 16L at 200K
# steps (2.83).
INHERIT_FIRST_MINUS_RANDOM_2X = -0.02
