"""Real-model test (marker ``real``) of the feature-space decomposition on SmolLM2-135M + the wiki corpus.

Expected from the issue's orientation measurement (layers 4-29 at 0.8 kappa: feature space ppl 52, weight SVD
101,905, no mean compensation 7,332, dense 17.1): on the last four layers alone the same ordering must hold,
and the cached-input evaluation must equal the plain forward."""

import pytest

from common.core import data, evaluation, layer_inputs, models
from common.sfsd import decomposition, lowrank

pytestmark = pytest.mark.real
KEY = "smollm2-135m"
LAYERS = [26, 27, 28, 29]


@pytest.fixture(scope="module")
def setup():
    model, tok = models.load_model(KEY)
    cal = data.token_windows(tok, KEY, "wiki", 16, 128, split="train")
    windows = data.token_windows(tok, KEY, "wiki", 4, 128)
    decomps = decomposition.decompose_model(model, cal, LAYERS, batch_size=8)
    return model, decomps, layer_inputs.LayerInputs(model, windows, batch_size=4), windows


def test_cached_inputs_equal_the_forward(setup):
    model, _, inputs, windows = setup
    assert inputs.perplexity(LAYERS[0]) == pytest.approx(evaluation.perplexity(model, windows), rel=1e-5)


def test_feature_space_beats_weight_svd_and_needs_its_mean_term(setup):
    model, decomps, inputs, _ = setup
    dense = inputs.perplexity(LAYERS[0])
    ppl = {}
    for method in ("feature", "feature_nomean", "weight_svd"):
        with lowrank.decomposed(model, decomps, method, lowrank.uniform_ranks(decomps, 80, LAYERS)):
            ppl[method] = inputs.perplexity(LAYERS[0])
    assert dense < ppl["feature"] < 1.5 * dense
    assert ppl["weight_svd"] > 2 * ppl["feature"]
    assert ppl["feature_nomean"] > ppl["feature"]
