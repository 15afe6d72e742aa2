"""The ``paper`` path with ``REPRO_WEIGHTS=random`` on CPU: Llama-3-8B's shipped config, shrunk 16x
(same code path as the full-size GPU dry run), loads offline and goes through notebook 01's measurement."""

import pytest

from common import arch, config, data, massive, models


@pytest.fixture
def random_weights(monkeypatch):
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    monkeypatch.setenv("REPRO_RANDOM_SHRINK", "16")


def test_paper_config_shape_is_llama3_8b():
    cfg = models.random_config(models.get_spec("llama-3-8b"))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (32, 4096, 14336)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)


def test_shrunk_config_keeps_head_size():
    full = models.random_config(models.get_spec("llama-3-8b"))
    small = models.random_config(models.get_spec("llama-3-8b"), shrink=16)
    assert small.hidden_size // small.num_attention_heads == full.hidden_size // full.num_attention_heads
    assert small.num_hidden_layers == 2 and small.num_key_value_heads == 1


def test_random_llama3_runs_notebook01_measurement_offline(random_weights):
    model, tok = models.load_model("llama-3-8b")
    assert len(arch.layers(model)) == 2 and arch.intermediate_size(model) == 14336 // 16
    windows = data.token_windows(tok, "llama-3-8b", "synthetic", n_windows=2, window_len=64)
    m = massive.measure(model, tok, "llama-3-8b", config.DETECTION_PROMPTS[:2], windows)
    assert m.report.layer is None  # random weights have no massive layer, and detection says so
    assert m.n_layers == 2
