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


def test_random_llama3_dora_macdrop_finetune_in_bf16(random_weights):
    """Notebook 03's paper path (DoRA + MacDrop, bf16 autocast, gradient checkpointing) on the shrunk random
    Llama-3-8B: training runs, MacDrop drops what p_t says, the adapter differs from the base model."""
    import torch

    from common import finetune

    tok = models.byte_tokenizer()
    pairs = data.instruction_pairs("synthetic", "train", 4, seed=0)
    train = data.tokenize_pairs(tok, "llama-3-8b", pairs, 96)
    settings = config.TrainSettings(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_len=96, save_steps=100,
                                    gradient_checkpointing=True, bf16=True)
    tuned = finetune.finetune("llama-3-8b", finetune.ARMS["dora_macdrop"], 0, settings, train, layer=0,
                              channels=[0, 1, 2, 3, 4])
    assert tuned.steps == 2 and [h["p"] for h in tuned.macdrop] == [0.4, 0.0]  # Step: p0 (1 - t/T), p0 = 0.8
    assert abs(tuned.macdrop[0]["drop_rate"] - 0.4) < 0.06  # 5 x 256 mask entries: 4 sigma is 0.055
    model, _ = finetune.load_tuned("llama-3-8b", tuned)
    ids = torch.tensor([train[0]["input_ids"]])
    with torch.no_grad():
        tuned_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert torch.isfinite(tuned_logits).all() and not torch.equal(tuned_logits, base_logits)
    again, _ = models.load_model("llama-3-8b")  # random weights are the same on every load
    assert torch.equal(again.lm_head.weight, model.get_base_model().lm_head.weight)
