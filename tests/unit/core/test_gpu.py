"""``common.core.gpu``: the device, placement, dtype policy, cleanup, and the memory and disk planner (its
arithmetic checked term by term against counts made here, and against published parameter counts)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoConfig

from common.core import gpu, models
from common.core.profiles import PROFILES, load_config
from common.sfsd import budgets, decomposition

GiB = gpu.GiB


def test_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    """``device()`` is cuda exactly when torch reports CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.device().type == "cuda"


def test_device_map_one_gpu_when_it_fits_spread_only_when_it_must(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [])
    assert gpu.device_map(100 * GiB) == {"": "cpu"}
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [80 * GiB] * 4)
    assert gpu.device_map(14 * GiB, 20 * GiB) == {"": 0}  # a 7B model: one GPU, not four
    assert gpu.device_map(60 * GiB, 20 * GiB) == "auto"  # 80 GiB > 90% of one GPU
    with pytest.raises(MemoryError, match="more GPUs"):
        gpu.device_map(300 * GiB)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert gpu.device_map(14 * GiB) == {"": 2}  # DDP: a whole copy on the process's own GPU
    with pytest.raises(ValueError):
        gpu.device_map(-1)


def test_weight_dtype_policy() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert gpu.weight_dtype("hub", cuda) == gpu.weight_dtype("local", cuda) == torch.bfloat16  # local: your own model
    assert gpu.weight_dtype("local", cpu) == torch.float32
    assert gpu.weight_dtype("hub", cpu) == gpu.weight_dtype("gguf", cuda) == torch.float32
    assert gpu.STATISTICS_DTYPE == torch.float32


def test_release_collects_reference_cycles() -> None:
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    gc.disable()
    try:
        del a, b
        assert ref() is not None  # the cycle outlives its names
        gpu.release()
        assert ref() is None
    finally:
        gc.enable()


def test_peak_is_none_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu.reset_peak()
    assert gpu.peak_bytes() is None


@pytest.mark.parametrize(("key", "billions"), [("llama-2-7b", 6.74), ("llama-3-8b", 8.03), ("mistral-7b", 7.24),
                                               ("llama-2-13b", 13.0), ("gpt2-medium", 0.355), ("gpt2-large", 0.774)])
def test_shape_params_match_the_published_counts(key, billions) -> None:
    """Parameter counts from the shipped configs, within 1% of the models' published sizes (norms and
    biases are left out)."""
    shape = gpu.Shape.from_config(models.model_config(key))
    assert shape.params / 1e9 == pytest.approx(billions, rel=0.01)


def test_shape_of_a_tiny_model_counts_its_parameters(tiny_llama, tiny_gpt2) -> None:
    """On real modules: the planner's count equals the model's linear + embedding parameters."""
    for model in (tiny_llama[0], tiny_gpt2[0]):
        shape = gpu.Shape.from_config(model.config)
        counted = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "wpe" not in n)
        assert shape.params == counted
        assert len(shape.projections) == len(budgets.targets(model, [0]))


def test_terms() -> None:
    shape = gpu.Shape(layers=2, hidden=8, inter=16, heads=2, kv_heads=1, head_dim=4, vocab=100)
    assert shape.projections == [(8, 8), (4, 8), (4, 8), (8, 8), (16, 8), (16, 8), (8, 16)]
    assert gpu.weights(shape, torch.bfloat16) == 2 * shape.params
    assert gpu.logits(shape, 10, torch.bfloat16) == 100 * 10 * (2 + 8)
    assert gpu.logits(shape, 10, torch.float32, training=True) == 100 * 10 * (4 + 12)
    eager = gpu.inference_activations(shape, 2, 5, torch.float32, eager=True)
    assert eager - gpu.inference_activations(shape, 2, 5, torch.float32) == 2 * 2 * 2 * 5 * 5 * 4
    with_ckpt = gpu.training_activations(shape, 2, 5, checkpointing=True)
    assert with_ckpt < gpu.training_activations(shape, 2, 5, checkpointing=False)
    assert gpu.adapter_params(shape, 4) == 2 * 4 * sum(m + n for m, n in shape.projections)


def test_decomposition_bytes_are_what_lowrank_stores(tiny_llama) -> None:
    """The planner's host/disk count of SFSD decompositions equals ``decomposition.stored_bytes`` of real ones."""
    model = tiny_llama[0]
    cal = torch.randint(3, models.TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    decomps = decomposition.decompose_model(model, cal, [1, 2], batch_size=2)
    shape = gpu.Shape.from_config(model.config)
    assert gpu.decomposition_bytes(shape, 2, 4) == decomposition.stored_bytes(decomps)


def test_task_requests() -> None:
    """Per task (requests, mean, longest); the cached scorer's batches run to their own longest (2 x mean)."""
    assert gpu.task_requests(("piqa",), None) == [(2 * 1838, 60, 260)]
    assert gpu.task_requests(("piqa", "boolq"), 100) == [(200, 60, 260), (200, 170, 900)]
    assert gpu.padded_tokens(("piqa", "boolq"), 100) == 200 * 120 + 200 * 340
    assert gpu.padded_tokens(("winogrande",), 10) == 20 * 60  # capped at the longest
    assert gpu.longest_request(("piqa", "boolq"), 100) == 900 and gpu.longest_request((), None) == 0
    assert gpu.task_requests(("piqa", "boolq"), {"piqa": 10, "boolq": 100}) == [(20, 60, 260), (200, 170, 900)]
    with pytest.raises(ValueError, match="n_items"):
        gpu.task_requests(("commonsense",), None)
    with pytest.raises(ValueError, match="n_items"):  # a mapping without the local task
        gpu.task_requests(("commonsense",), {"piqa": 10})
    with pytest.raises(ValueError, match="unknown task"):
        gpu.task_requests(("nope",), 3)


def test_local_task_sizes_bound_the_real_requests(byte_tok) -> None:
    """The planner's longest local request (in tokens) is not below what the byte tokenizer (the longest
    tokenisation there is: one token a byte) makes of the real docs, so it never underplans them."""
    from common.core import tasks

    for name, (choices, _, longest) in gpu.LOCAL_TASK_SIZES.items():
        reqs = tasks.requests(name, 20, 0)
        assert max(len(r["choices"]) for r in reqs) <= choices
        if name == "commonsense":  # wiki tasks are tokenised by real BPE tokenizers: bytes would overstate them
            assert max(len(byte_tok(c + x)["input_ids"]) for r in reqs for c, x in r["pairs"]) <= longest


def _paper_plan(notebook: str) -> gpu.Plan:
    cfg = load_config(notebook, "paper")
    keys = {k for k in getattr(cfg, "models", ())} | {r[0] for r in getattr(cfg, "runs", ())}
    shapes = {k: gpu.Shape.from_config(models.model_config(k)) for k in keys}
    return gpu.notebook_plan(cfg, shapes, torch.bfloat16)


@pytest.mark.parametrize("notebook", sorted(PROFILES["paper"]))
def test_every_paper_notebook_fits_one_80gb_gpu(notebook) -> None:
    """Issue 18's bar: every notebook's paper peak within one 80 GB GPU (with 10% left for the context)."""
    plan = _paper_plan(notebook)
    assert plan.steps and all(s.gpu > 0 for s in plan.steps)
    gpu.check(plan, [80 * 10 ** 9])  # raises with the step and its largest term otherwise


def test_notebook_05_disk_is_bounded() -> None:
    """The two paper models' decompositions: at most half of the ~93 GiB the fp32, three-matrix cache took."""
    plan = _paper_plan("05_lowrank_decomposition")
    assert plan.disk <= 93 * GiB / 2
    assert all(s.terms["other_models"] > 0 for s in plan.steps)  # both 7B models stay loaded


def test_check_refuses_with_what_to_change() -> None:
    plan = _paper_plan("02_massive_weight_ablation")
    with pytest.raises(MemoryError, match=r"step .* needs .* use "):
        gpu.check(plan, [16 * GiB])
    gpu.check(plan, [16 * GiB] * 4)  # spread by device_map over four
    gpu.check(plan, [])  # no GPU: nothing to check


def test_host_warning_names_the_step_when_ram_is_short() -> None:
    plan = _paper_plan("05_lowrank_decomposition")
    assert gpu.host_warning(plan, total=10 * plan.host) is None
    warning = gpu.host_warning(plan, total=plan.host // 2)
    assert "decompose + evaluate" in warning and "cache_every" in warning
    assert gpu.host_memory() > 1 << 30


def test_paper_config_dtype_from_auto_config() -> None:
    """``Shape.from_config`` reads a plain AutoConfig the same way (GPT-2's n_embd / n_layer names)."""
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=500)
    shape = gpu.Shape.from_config(config)
    assert (shape.hidden, shape.layers, shape.inter, shape.gated, shape.tied) == (64, 3, 256, False, True)


def test_shape_of_the_inheritune_gpt() -> None:
    """Inheritune's nanoGPT config reads as GPT-2's layout: 4d FFN, no gate, tied embeddings."""
    from common.core.profiles import GPTConfig

    shape = gpu.Shape.from_config(GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304))
    assert shape == gpu.Shape(24, 1024, 4096, 16, 16, 64, 50304, gated=False, tied=True)
    assert shape.largest == 4096 * 1024


@pytest.mark.parametrize("family, extra", [("llama", {}), ("gpt2", {}), ("gpt_neox", {}), ("opt", {}), ("phi", {}),
                                           ("falcon", {"multi_query": True}), ("bloom", {}), ("gptj", {})])
def test_planned_parameters_match_the_model_in_every_layout(family: str, extra: dict) -> None:
    """The planner's parameter count is within 2% of a real model's (built on the meta device at the family's default
    size): two FFN matrices for ungated families (GPT-NeoX, OPT, Falcon, ...) and three for gated ones, OPT's
    ``ffn_dim``, Falcon's multi-query attention. A too-large refusal of your own model rests on it."""
    from transformers import AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=50_000, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    assert gpu.Shape.from_config(config).params == pytest.approx(real, rel=0.02)
