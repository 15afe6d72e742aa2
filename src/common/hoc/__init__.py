"""House of Cards (arXiv 2410.01866): massive-weight detection, weight edits, attacks, MacDrop, fine-tuning and
its scoring, figures, the paper's numbers. Imports only ``common.core``."""
