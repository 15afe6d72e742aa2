"""common.hoc.figures' notebook-01 panels draw from a tiny measurement without error."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from common.core import data, models  # noqa: E402
from common.hoc import detection, figures  # noqa: E402


@pytest.fixture(scope="module")
def measurements():
    out = {}
    for key in ("tiny-llama", "tiny-gpt2"):
        model, tok = models.load_model(key)
        windows = data.token_windows(tok, key, "synthetic", 2, 32)
        out[key] = detection.measure(model, tok, key, ("Summer is warm.", "I am here."), windows, k=3)
    return out


@pytest.mark.parametrize("draw", [lambda ms: figures.plot_layer_topk(ms, "hidden", "|h|"),
                                  lambda ms: figures.plot_layer_topk(ms, "inter", "|x|"), figures.plot_origin,
                                  figures.plot_channel_contributions, figures.plot_first_token_stability])
def test_panels_one_axis_per_model(measurements, draw) -> None:
    fig = draw(measurements)
    found = [k for k, m in measurements.items() if m.report.found]
    assert len(fig.axes) in (len(measurements), len(found))
    plt.close(fig)


def test_plot_post_norm(measurements) -> None:
    m = measurements["tiny-llama"]
    post = {"raw_ffn": [1.0, 2.0], "post_norm": [3.0, 4.0], "gain": [5.0, -6.0], "median_gain": [1.0, 1.0]}
    fig = figures.plot_post_norm(type(m)(**{**m.__dict__, "post_norm": post}))
    assert "hidden dim" in fig.axes[0].get_title()
    plt.close(fig)
