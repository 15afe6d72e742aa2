"""The gpu tier (DESIGN §7): what only a real CUDA device can show. Skipped without one; ``make gpu-check``
runs them on a GPU box. The CPU-side device tier (tests/unit/test_device_paths.py) covers the same paths on a
fake device; these confirm them, and the planner, on the hardware."""

from __future__ import annotations

import copy

import pytest
import torch

from common.core import evaluation, gpu, layer_inputs, models
from common.inheritune import attention
from common.sfsd import decomposition, lowrank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    for var in ("REPRO_WEIGHTS", "REPRO_RANDOM_SHRINK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def _ids(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, models.TINY_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_decompositions_on_cuda_match_the_host_and_reload(tmp_path) -> None:
    host, _ = models.load_model("tiny-llama", dtype=torch.float32)
    host = host.cpu()
    dev = copy.deepcopy(host).to(CUDA)
    cal, test = _ids(8, 32), _ids(4, 32, seed=1)
    want = decomposition.decompose_model(host, cal, [1, 2], batch_size=4)
    got = decomposition.decompose_model(dev, cal, [1, 2], batch_size=4, cache=tmp_path / "d")
    again = decomposition.decompose_model(dev, cal, [1, 2], batch_size=4, cache=tmp_path / "d")
    assert decomposition.decomposition_digest(got) == decomposition.decomposition_digest(again)
    for p, d in want.items():
        torch.testing.assert_close(got[p].spectra["centred"][0], d.spectra["centred"][0], rtol=1e-3, atol=1e-4)
        assert got[p].mean.device.type == "cpu"
    def ppl(model, decomps):
        inputs = layer_inputs.LayerInputs(model, test, batch_size=2)
        out = {}
        for method in decomposition.METHODS:
            with lowrank.decomposed(model, decomps, method, lowrank.uniform_ranks(decomps, 50, [1, 2])):
                out[method] = inputs.perplexity(1)
        return out

    assert ppl(dev, again) == pytest.approx(ppl(host, want), rel=1e-3)  # TF32 / kernel order: not bit-exact


def test_a_model_that_fits_goes_on_one_gpu() -> None:
    assert gpu.gpu_memory() and gpu.device_map(1 << 30) == {"": 0}


def test_bf16_attention_is_refused_and_fp32_measured() -> None:
    model, _ = models.load_model("tiny-llama", dtype=torch.bfloat16)
    model.to(CUDA)
    with pytest.raises(ValueError, match="STATISTICS_DTYPE"):
        attention.capture_attention(model, [_ids(2, 16)])
    model.float()
    assert attention.capture_attention(model, [_ids(2, 16)]).max_rank().numel() == len(model.model.layers)


def test_release_returns_a_dropped_models_memory() -> None:
    gpu.release()
    before = torch.cuda.memory_allocated()
    model, _ = models.load_model("tiny-llama")
    model.to(CUDA)
    assert torch.cuda.memory_allocated() > before
    del model
    gpu.release()
    assert torch.cuda.memory_allocated() <= before + 2**20  # the model's tensors are gone (allocator slack: 1 MiB)


def test_planner_predicts_the_measured_perplexity_peak() -> None:
    """A 1B-class random Llama in bf16 on 2 x 2048 tokens: the measured peak lies within 0.6-1.6x the plan."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=128256, max_position_embeddings=4096)
    with torch.device(CUDA):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    shape = gpu.Shape.from_config(config)
    planned = (gpu.weights(shape, torch.bfloat16) + gpu.inference_activations(shape, 2, 2048, torch.bfloat16)
               + gpu.logits(shape, 2 * 2048, torch.bfloat16))
    gpu.reset_peak()
    evaluation.perplexity(model, _ids(2, 2048), batch_size=2)
    measured = gpu.peak_bytes()
    assert 0.6 * planned <= measured <= 1.6 * planned, (measured / gpu.GiB, planned / gpu.GiB)
