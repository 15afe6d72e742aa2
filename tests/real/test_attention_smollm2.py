"""Real-model test (marker ``real``) of the attention metrics on SmolLM2-135M + the wiki corpus.

Expected shape from the research measurement (offline_resources.md §4, made with independent code on a
128-token passage): the mean share of attention mass in the largest column rises from about 0.23 in the first
third of the 30 layers to about 0.70 in the last third, and the sink column is position 0 in deep layers.
"""

import pytest
import torch

from common.core import data, models
from common.inheritune import attention

pytestmark = pytest.mark.real
KEY = "smollm2-135m"


@pytest.fixture(scope="module")
def stats() -> attention.AttentionStats:
    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", n_windows=8, window_len=100)
    return attention.capture_attention(model, windows.split(4))


def test_single_column_share_rises_with_depth(stats):
    first, _, last = attention.depth_thirds(stats.per_layer("maxcol_share"))
    assert 0.15 < first < 0.35 and 0.55 < last < 0.8
    assert last > 2 * first


def test_deep_sink_is_position_zero_and_deep_heads_collapse(stats):
    n = stats.metrics["rank"].shape[1]
    assert (stats.sink_position()[n // 2:] == 0).all()
    collapsed = stats.collapsed_heads()
    assert collapsed[n // 2:].sum() > 3 * collapsed[: n // 2].sum()
    assert torch.all(stats.max_rank() >= 1)
