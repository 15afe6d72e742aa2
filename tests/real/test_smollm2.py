"""Real-model tests (marker ``real``): SmolLM2-135M + the wiki corpus, installed by ``make test``.

Expected values come from the research measurements (offline_resources.md §3, §5; issue 3), made
independently of this code: massive layer index 11, hidden dim 507, intermediate channels 1229/1487,
held-out perplexity around 17.
"""

import math

import pytest

from common.core import data, evaluation, models, profiles
from common.hoc import detection

pytestmark = pytest.mark.real
KEY = "smollm2-135m"


@pytest.fixture(scope="module")
def measurement() -> detection.Measurement:
    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", n_windows=4, window_len=128)
    return detection.measure(model, tok, KEY, profiles.DETECTION_PROMPTS, windows)


def test_detection_finds_the_known_layer_dim_and_channels(measurement):
    r = measurement.report
    assert r.layer == 11
    assert r.hidden_dims[0] == 507
    assert {1229, 1487} <= set(r.channels)
    assert r.channels[:2] == [1229, 1487]
    assert r.hidden_ratio >= 1000  # Sun's criterion against the all-token median


def test_the_ffn_writes_the_massive_dim(measurement):
    split = detection.origin_split(measurement.prompts, 11, [507])
    assert abs(split["ffn"]) > 100 * abs(split["attn"])


def test_first_token_is_causal(measurement):
    assert measurement.alone_vs_prompt < 1e-5  # relative; fp32 rounding only


def test_heldout_perplexity_is_plausible():
    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", n_windows=8, window_len=256)
    ppl = evaluation.perplexity(model, windows, batch_size=4)
    assert math.isfinite(ppl)
    assert 10 < ppl < 30  # research measured ~17 on a comparable sample
