"""The ``paper`` path with ``REPRO_WEIGHTS=random`` on CPU: Llama-3-8B's shipped config, shrunk 16x
(same code path as the full-size GPU dry run), loads offline and goes through notebook 01's measurement."""

import pytest
import torch

from common.core import arch, data, models, profiles
from common.hoc import detection
from common.inheritune import attention


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
    assert small.num_hidden_layers == models.MIN_RANDOM_LAYERS == 4 and small.num_key_value_heads == 1  # 32 // 16 = 2, floored


def test_random_llama3_runs_notebook01_measurement_offline(random_weights):
    model, tok = models.load_model("llama-3-8b")
    assert len(arch.layers(model)) == 4 and arch.intermediate_size(model) == 14336 // 16
    windows = data.token_windows(tok, "llama-3-8b", "synthetic", n_windows=2, window_len=64)
    m = detection.measure(model, tok, "llama-3-8b", profiles.DETECTION_PROMPTS[:2], windows)
    assert m.n_layers == 4
    # the dry run plants HoC's circuit (random weights have none), and detection finds it
    assert (m.report.layer, m.report.channels[0]) == (models.PLANT["layer"], models.PLANT["channel"])
    assert models.PLANT["hidden_dim"] in m.report.hidden_dims


def test_unplanted_random_llama_has_no_massive_layer(random_weights, monkeypatch):
    """Control for the plant: the same random Llama-3-8B without it has no massive layer, and detection says so."""
    monkeypatch.setattr(models, "plant_massive_weight", lambda *a, **k: None)
    model, tok = models.load_model("llama-3-8b")
    windows = data.token_windows(tok, "llama-3-8b", "synthetic", n_windows=2, window_len=64)
    assert detection.measure(model, tok, "llama-3-8b", profiles.DETECTION_PROMPTS[:2], windows).report.layer is None


def test_random_llama3_dora_macdrop_finetune_in_bf16(random_weights):
    """Notebook 03's paper path (DoRA + MacDrop, bf16 autocast, gradient checkpointing) on the shrunk random
    Llama-3-8B: training runs, MacDrop drops what p_t says, the adapter differs from the base model."""
    from common.hoc import finetune

    tok = models.byte_tokenizer()
    pairs = data.instruction_pairs("synthetic", "train", 4, seed=0)
    train = data.tokenize_pairs(tok, "llama-3-8b", pairs, 96)
    settings = profiles.TrainSettings(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_len=96, save_steps=100,
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


def test_random_gpt2_medium_runs_notebook04_analysis_offline(random_weights, monkeypatch):
    """Notebook 04's paper path on the shrunk random GPT-2 medium (HF Conv1D attention switched to eager for
    the pass): at init the logits q.k are ~0, so every head is uniform causal attention, whose k* and m* at
    T = 100 are 5 and 30 (research inheritune.md §1.7); the model is back on its own implementation after."""
    model, tok = models.load_model("gpt2-medium")
    assert len(arch.layers(model)) == 4 and model.config.n_embd == 1024 // 16  # 24 // 16 layers, floored at 4
    before = model.config._attn_implementation
    ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    stats = attention.capture_attention(model, [ids])
    assert stats.metrics["rank"].shape == (2, 4, model.config.n_head)
    assert (stats.metrics["rank"] == 5).all() and (stats.metrics["mass"] == 30).all()
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="exceeds the model's context"):
        attention.capture_attention(model, [torch.zeros(1, 1025, dtype=torch.long)])


def test_dry_run_replaces_openwebtext_by_the_small_data(random_weights, monkeypatch):
    """Under REPRO_WEIGHTS=random the paper corpus is the small profile's (DESIGN §2) and the GPT-2 BPE stream
    is the byte stream (no tokenizer files offline)."""
    fake = [{"title": "A", "extract": "first doc"}, {"title": "B", "extract": "second"}]
    monkeypatch.setattr(data, "wiki_split", lambda split: fake)
    assert data.corpus_texts("openwebtext", "train") == ["first doc", "second"]
    stream = data.token_stream("openwebtext", "train", "gpt2")
    assert bytes(stream.tolist()) == b"first doc\n\nsecond"


@pytest.mark.usefixtures("random_weights")
def test_random_mistral7b_runs_notebook05_decomposition_and_search_offline():
    """Notebook 05's paper path on the shrunk random Mistral-7B (GQA: k/v 1024 -> 64 wide, 14336 -> 896 MLP):
    the shipped config has the paper's shape, the decomposition covers every unprotected projection with the
    paper's kappa structure, and a perplexity search runs on it and respects its bound."""
    from common.core import layer_inputs
    from common.sfsd import budgets, decomposition, search

    full = models.random_config(models.get_spec("mistral-7b"))
    assert (full.num_hidden_layers, full.hidden_size, full.intermediate_size, full.num_key_value_heads) == (32, 4096, 14336, 8)
    assert budgets.kappa(14336, 4096) == 3185 and budgets.kappa(1024, 4096) == 819  # research §1.1's table
    model, tok = models.load_model("mistral-7b")
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    decomps = decomposition.decompose_model(model, ids, [1], batch_size=2)
    assert [d.target.kind for d in decomps.values()] == ["q", "k", "v", "o", "gate", "up", "down"]
    state = search.perplexity_search(model, decomps, layer_inputs.LayerInputs(model, ids, batch_size=2), tolerance=1.5,
                                      protected=1, scan="bisect")
    assert {s["layer"] for s in state.steps} == {1}
    assert all(s["tried"][str(s["rank"])] <= s["bound"] for s in state.steps if s["rank"] is not None)
