"""Surgical Feature-Space Decomposition (arXiv 2405.13039): budgets, decompositions, factorised modules,
searches, notebook 05's experiments, figures, the paper's numbers. Imports only ``common.core``."""
