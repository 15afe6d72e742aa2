"""The device tier (issue 18 §3): every device-sensitive path with the model on a device that is not the
host's, on a CPU-only machine (``fake_device``: real numbers, CUDA's device rules). Each test runs the path
on the host first and then on the device, and asks for the host's result: a host conversion (``.numpy()``
of a device tensor), a module built on the host inside a device model, cached statistics reloaded to the
wrong device, or sums allocated on another GPU than their inputs all fail here as they would on a GPU box.
Tests that need a real GPU are in tests/gpu (``-m gpu``, ``make gpu-check``)."""

from __future__ import annotations

import copy

import pytest
import torch
from fake_device import SECOND, fake_accelerator, on_host
from tiny_families import sharpen

from common.core import evaluation, layer_inputs, models, tasks
from common.core.capture import capture
from common.core.profiles import DETECTION_PROMPTS
from common.hoc import detection, edits, macdrop
from common.inheritune import attention
from common.sfsd import decomposition, experiments, lowrank, search
from common.synthesis import protected

pytestmark = [pytest.mark.device, pytest.mark.usefixtures("one_thread")]

KEY = "tiny-llama"
LAYERS = [1, 2, 3]


def _windows(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, models.TINY_VOCAB, (n, t), generator=g)


@pytest.fixture
def pair(tiny_llama):
    """(host model, device copy factory, tokenizer): the same tiny-llama twice."""
    model, tok = tiny_llama
    return model, (lambda: copy.deepcopy(model)), tok


@pytest.fixture
def sharp_pair(pair):
    """``pair`` with layers that matter (``sharpen``): the searches then make a mix of decisions."""
    sharpen(pair[0])
    return pair


def _ppl_per_method(model, decomps, windows) -> dict[str, float]:
    inputs = layer_inputs.LayerInputs(model, windows, batch_size=3)
    out = {}
    for method in decomposition.METHODS:
        with lowrank.decomposed(model, decomps, method, lowrank.uniform_ranks(decomps, 50, LAYERS)):
            out[method] = inputs.perplexity(LAYERS[0])
    return out


def _same_statistics(got, want) -> None:
    """Equal to float32 round-off (the device path's kernels may sum in another order)."""
    assert list(got) == list(want)
    for p, d in want.items():
        for a, b in ((got[p].mean, d.mean), *((got[p].spectra[v][0], d.spectra[v][0]) for v in decomposition.VARIANTS),
                     (got[p].svd[1], d.svd[1])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def _all_host(decomps) -> bool:
    return all(on_host(t) for d in decomps.values()
               for t in (d.mean, *d.svd, *(x for pair in d.spectra.values() for x in pair)))


def test_decompose_digest_factors_and_cached_reload_on_device(pair, tmp_path) -> None:
    """Decompositions gathered on the device equal the host's, live on the host, digest without a host
    conversion error, and factorise on the device, also after a reload from the safetensors cache."""
    host, clone, _ = pair
    cal, test = _windows(), _windows(seed=1)
    want = decomposition.decompose_model(host, cal, LAYERS, batch_size=3)
    want_ppl = _ppl_per_method(host, want, test)
    with fake_accelerator() as dev:
        model = clone().to(dev)
        got = decomposition.decompose_model(model, cal, LAYERS, batch_size=3, cache=tmp_path)
        assert _all_host(got)
        _same_statistics(got, want)
        assert len(decomposition.decomposition_digest(got)) == 16  # a host conversion of device tensors raised here
        assert _ppl_per_method(model, got, test) == pytest.approx(want_ppl, rel=1e-4)
        calls = len(decomposition.EIGH_CALLS)
        reloaded = decomposition.decompose_model(model, cal, LAYERS, batch_size=3, cache=tmp_path)
        assert len(decomposition.EIGH_CALLS) == calls  # read back, not recomputed
        assert _all_host(reloaded)
        assert _ppl_per_method(model, reloaded, test) == pytest.approx(want_ppl, rel=1e-4)


def test_searches_and_uniform_table_on_device(sharp_pair) -> None:
    """Both surgical searches and notebook 05's uniform table (digests, cached cells) make the host's decisions
    (the table's weight-SVD cells depend on the weights alone: equal to round-off)."""
    host, clone, tok = sharp_pair
    cal, held_out = _windows(), _windows(4, 16, seed=2)
    docs = tasks.build_docs("commonsense", 30, 0)

    def run(model):
        decomps = decomposition.decompose_model(model, cal, LAYERS, batch_size=3)
        inputs = layer_inputs.LayerInputs(model, held_out, batch_size=2)
        ppl = search.perplexity_search(model, decomps, inputs, tolerance=1.05, protected=2, scan="bisect")
        mc = evaluation.multiple_choice(model, tok, KEY, docs[:6], "acc", 8, keep=[0, 3])
        task = search.task_search(model, decomps, [mc], mc, layers=[3], protected=2, scan="bisect")
        table = experiments.uniform_table(model, KEY, decomps, inputs, None, ("weight_svd", "feature"), (80, 50), 1)
        return ppl.ranks, task.ranks, table[table.method != "feature"].ppl.tolist()

    want = run(host)
    assert len(set(want[0].values())) > 1  # a mix of ranks: agreement is informative
    with fake_accelerator() as dev:
        got = run(clone().to(dev))
    assert got[:2] == want[:2]
    assert got[2] == pytest.approx(want[2], rel=1e-4)


def _spread(model, devices: list[torch.device]):
    """Layer i on ``devices[i % len]`` with a pre-hook that brings its inputs there: what accelerate's
    ``device_map`` does to a model over several GPUs (AlignDevicesHook), on the fake devices."""
    def align(dev):
        def move(t):
            return t.to(dev) if isinstance(t, torch.Tensor) else t

        def hook(_module, args, kwargs):
            return (tuple(move(a) for a in args),
                    {k: (tuple(move(x) for x in v) if isinstance(v, tuple) else move(v)) for k, v in kwargs.items()})
        return hook

    for i, layer in enumerate(model.model.layers):
        dev = devices[i % len(devices)]
        layer.to(dev)
        layer.register_forward_pre_hook(align(dev), with_kwargs=True)
    return model


def test_statistics_stay_on_each_layers_device_under_a_spread_model(pair) -> None:
    """Layers on two GPUs: each layer's moments are summed on that layer's device and its decompositions
    equal the one-device result (the first-parameter device would mix devices)."""
    host, clone, _ = pair
    cal = _windows()
    want = decomposition.decompose_model(host, cal, LAYERS, batch_size=3)
    with fake_accelerator() as dev:
        model = clone().to(dev)
        _spread(model, [dev, SECOND])
        model.model.norm.to(SECOND)
        model.lm_head.to(SECOND)
        got = decomposition.decompose_model(model, cal, LAYERS, batch_size=3)
        moms = protected.layer_moments(model, cal, 1, batch_size=3)
        assert {m.gram.device for m, _ in moms.values()} == {SECOND}
        spread_ppl = _ppl_per_method(model, got, _windows(seed=1))
    _same_statistics(got, want)
    assert spread_ppl == pytest.approx(_ppl_per_method(host, want, _windows(seed=1)), rel=1e-4)


def test_row_protected_pair_on_device(pair) -> None:
    """Notebook 06's row-protected pair is built on the module's device from device moments."""
    host, clone, _ = pair
    cal = _windows()
    path = "model.layers.1.mlp.up_proj"

    def run(model):
        moms = protected.layer_moments(model, cal, 1, batch_size=3)
        module = model.get_submodule(path)
        rows = [0, 5, 7]
        pair_ = protected.protected_factorised(module, *moms[path], rows, "feature", 4)
        x = torch.ones(2, module.in_features, device=module.weight.device)
        return pair_(x).cpu()

    want = run(host)
    with fake_accelerator() as dev:
        got = run(clone().to(dev))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_capture_attention_perplexity_and_edits_on_device(pair) -> None:
    """Notebooks 01/02/04's paths: capture, detection, attention metrics, perplexity under a weight edit."""
    host, clone, tok = pair
    windows = _windows(4, 16)

    def run(model):
        stats = capture(model, windows.split(2), whole=True)
        m = detection.measure(model, tok, KEY, DETECTION_PROMPTS[:2], windows, k=3, batch_size=2)
        att = attention.capture_attention(model, windows.split(2))
        with edits.zero_channels(model, {1: [0, 1]}):
            ppl = evaluation.perplexity(model, windows, 2)
        return stats.pos0["inter"], m.report.layer, att.max_rank(), ppl

    want = run(host)
    with fake_accelerator() as dev:
        got = run(clone().to(dev))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4 * float(want[0].abs().max()))
    assert got[1] == want[1]
    torch.testing.assert_close(got[2], want[2])
    assert got[3] == pytest.approx(want[3], rel=1e-4)


def test_zero_shot_on_device(pair) -> None:
    """lm-eval on the in-memory device model scores as on the host."""
    host, clone, tok = pair
    want = evaluation.zero_shot(host, tok, ["commonsense"], 6, batch_size=3)["commonsense"]["correct"]
    with fake_accelerator() as dev:
        got = evaluation.zero_shot(clone().to(dev), tok, ["commonsense"], 6, batch_size=3)["commonsense"]["correct"]
    assert got == want


def test_macdrop_masks_on_device(pair) -> None:
    """MacDrop's masks are drawn on the weights' device and applied/restored there, bit-exactly."""
    from peft import LoraConfig, get_peft_model

    host, clone, _ = pair
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])

    def run(model):
        tuned = get_peft_model(model, copy.deepcopy(config))
        drop = macdrop.MacDrop(tuned, 1, [0, 3])
        up = tuned.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight
        before = up.detach().cpu().clone()
        keep = drop.mask(0.5, step=3)
        dropped = drop.apply(keep)
        masked = up.detach().cpu().clone()
        drop.restore()
        assert torch.equal(up.detach().cpu(), before)
        return keep.cpu(), dropped, masked

    want = run(host)
    with fake_accelerator() as dev:
        got = run(clone().to(dev))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])


def test_fake_device_enforces_cuda_rules() -> None:
    """The tier's own check: what CUDA refuses is refused on the fake device, what it allows works, and the
    numbers are the host's."""
    import numpy as np

    host = torch.arange(6.0).reshape(2, 3)
    with fake_accelerator() as dev:
        x = host.to(dev)
        assert x.device == dev and not on_host(x)
        assert on_host(x.cpu()) and torch.equal((x * 2).cpu(), host * 2)
        assert float(x.sum()) == 15.0 and x.tolist() == host.tolist() and int(x.max()) == 5
        assert (x + torch.tensor(1.0)).device == dev  # 0-dim host scalars mix, as on CUDA
        assert torch.equal(x[torch.tensor([1])].cpu(), host[[1]])  # host index tensors too
        for bad in (lambda: x + host, lambda: x + x.to(SECOND), lambda: x.numpy(), lambda: np.asarray(x),
                    lambda: torch.rand(3, device=dev, generator=torch.Generator().manual_seed(0))):
            with pytest.raises((RuntimeError, TypeError)):
                bad()
        g = torch.Generator(device=dev).manual_seed(0)
        assert torch.rand(3, device=dev, generator=g).device == dev
        lin = torch.nn.Linear(3, 2).to(dev)
        lin(x).sum().backward()
        assert lin.weight.grad.device == dev
        with pytest.raises(RuntimeError, match="same device"):
            lin(host)


def test_park_and_unpark_move_a_model_between_the_device_and_the_host(pair, monkeypatch) -> None:
    """Notebook 06 keeps several models and holds one at a time on the GPU: ``park`` moves one to the host,
    ``unpark`` back to ``device()``, with the same outputs; a model spread by device_map is left alone."""
    from common.core import gpu

    host, clone, _ = pair
    ids = _windows(2, 8)
    with torch.no_grad():
        want = host(input_ids=ids).logits
    with fake_accelerator() as dev:
        monkeypatch.setattr(gpu, "device", lambda: dev)
        model = clone().to(dev)
        assert on_host(next(gpu.park(model).parameters()))
        assert next(gpu.unpark(model).parameters()).device == dev
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids.to(dev)).logits.cpu(), want, rtol=1e-4, atol=1e-4)
        model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
        assert next(gpu.park(model).parameters()).device == dev  # spread: stays
