"""Inheritune (arXiv 2404.08634): attention-degeneration metrics, the compact GPT, training, inheritance and
growth, figures, the paper's numbers. Imports only ``common.core``."""
