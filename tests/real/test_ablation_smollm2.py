"""Real-model attack tests (marker ``real``, issue 4 §5): SmolLM2 on the held-out wiki windows.

Thresholds come from the paper's pattern and the research measurements (zero top-5 at layer 11: 3.5x;
keep-only: 1.10x; random: < 0.2%; joint top-2 of layers 1/2/11: 13.6x), not from this code's output.
"""

import pytest

from common.core import data, evaluation, models, profiles
from common.hoc import ablation, detection, edits

pytestmark = pytest.mark.real
KEY = "smollm2-135m"


@pytest.fixture(scope="module")
def setup_model():
    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", n_windows=8, window_len=256)
    m = detection.measure(model, tok, KEY, profiles.DETECTION_PROMPTS, windows, k=5)
    ranked = detection.top_channels(m.prompts.pos0["inter"], m.report.layer, 5)[0]
    return model, windows, m, ranked, evaluation.perplexity(model, windows)


def _ratio(model, windows, base, ctx) -> float:
    with ctx:
        return evaluation.perplexity(model, windows) / base


def test_zero_top5_breaks_keep_only_and_random_do_not(setup_model):
    model, windows, m, ranked, base = setup_model
    layer = m.report.layer
    assert _ratio(model, windows, base, edits.zero_massive(model, layer, ranked, 5)) >= 2
    assert _ratio(model, windows, base, edits.keep_only_massive(model, layer, ranked, 5)) < 1.25
    for seed in (0, 1, 2):
        assert _ratio(model, windows, base, edits.zero_random(model, layer, 5, seed, ranked)) < 1.02


def test_joint_top2_of_the_writer_layers_breaks_harder(setup_model):
    model, windows, m, _, base = setup_model
    writers = ablation.writer_layers(m.prompts, m.report.hidden_dims[0], m.report.layer)
    assert writers == [1, 2, 11]
    attack = ablation.joint_top(m.prompts, writers, 2)
    assert _ratio(model, windows, base, attack.context(model)) >= 5
