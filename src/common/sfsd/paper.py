"""SFSD's paper numbers (Chavan, Lele & Gupta, *Surgical Feature-Space Decomposition of LLMs*, arXiv 2405.13039,
ACL 2024, and the authors' README tables; research sfsd.md §3), each with its exact source. The library, the
notebooks and ``claims.yaml`` (``"sfsd.paper:NAME"``) read them from here."""

from __future__ import annotations

# SFSD README Table A (uniform budgets; LLaMA-7B, 0-shot, average of the six commonsense tasks, %): the dense model
# and both methods at 5.4B parameters (80%) and 3.4B (50%).
TABLE_A = {"dense": 69.61, ("feature", 80): 64.85, ("weight_svd", 80): 50.41, ("feature", 50): 47.26,
           ("weight_svd", 50): 41.04}
TABLE_A_REF = "SFSD Table A (LLaMA-7B)"

# SFSD README: dense LLaMA-7B perplexity on WikiText-2 at sequence length 128.
DENSE_PPL = 12.33
DENSE_PPL_REF = "SFSD README (LLaMA-7B, WikiText-2 seq 128)"

# SFSD README Table B (task-specific search; LLaMA-7B, PIQA): test-split accuracy after 35 compressed modules minus
# the dense model's, 77.21 - 78.23 points (at 96% of the parameters).
TASK_SEARCH_TEST_MINUS_DENSE = -0.0102
TASK_SEARCH_REF = "SFSD Table B (LLaMA-7B PIQA, 35 modules: 77.21 vs 78.23)"
