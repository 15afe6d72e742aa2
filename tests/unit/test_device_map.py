"""Models beyond one GPU (issue 9 §1) on CPU: a model that from_pretrained dispatches (``hf_device_map`` set,
accelerate's hooks on offloaded layers: what ``device_map="auto"`` does to a 13B-70B model on several GPUs)
goes through ``load_model``'s device handling, the hook-based measurement (``detection.measure``,
``capture.capture``) and lm-eval (``evaluation.zero_shot``) with the results of the plain load;
``_load_hub`` asks for ``device_map="auto"`` and safetensors (one device per process under ``accelerate
launch``). transformers 5 dispatches only a map over several devices or with disk offload, so on a CPU box
"auto" just places the model: the dispatched cases offload layers to disk instead."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.core import evaluation, gpu, models
from common.core.capture import POINTS, capture
from common.core.models import ModelSpec
from common.core.profiles import DETECTION_PROMPTS
from common.hoc import detection

DISK_KEY = "tiny-llama-saved"


@pytest.fixture
def saved_tiny(tmp_path, monkeypatch, tiny_llama):
    """tiny-llama saved with save_pretrained (safetensors), registered for this test as a hub model whose hub
    id is the local directory (so ``load_model`` takes the ``_load_hub`` path with ``device_map="auto"``)."""
    model, tok = tiny_llama
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    monkeypatch.setitem(models.REGISTRY, DISK_KEY, ModelSpec(DISK_KEY, "tiny Llama from disk", "hub", True,
                                                             hub_id=str(path), revision="main"))
    return model, tok


#: tiny-llama with layers 2-3 offloaded to disk: accelerate dispatches it (hf_device_map) and its
#: AlignDevicesHooks load those layers' weights for each forward (meta placeholders in between). On a GPU box
#: device_map="auto" spreads a 13B-70B model the same way, over the GPUs.
OFFLOAD_MAP = {**{name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.layers.0",
                                           "model.layers.1", "model.norm", "lm_head")},
               "model.layers.2": "disk", "model.layers.3": "disk"}


def _dispatched(monkeypatch, tmp_path):
    """``load_model`` of the saved tiny-llama when from_pretrained dispatches it (``OFFLOAD_MAP`` in place of
    "auto", which on a one-device machine places the model without hooks), on what ``load_model`` takes for
    a GPU box: the dispatched model must be left where accelerate put it."""
    real = AutoModelForCausalLM.from_pretrained
    seen = {}

    def dispatching(name, **kw):
        seen.update(kw)
        return real(name, **{**kw, "device_map": OFFLOAD_MAP}, offload_folder=str(tmp_path / "offload"))

    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", dispatching)
        m.setattr(models, "device", lambda: torch.device("cuda"))
        model, tok = models.load_model(DISK_KEY, dtype=torch.float32)
    assert seen["device_map"] == {"": "cpu"} and seen["use_safetensors"] is True  # no CUDA here
    assert model.hf_device_map == OFFLOAD_MAP and not model.training
    assert model.model.layers[2].mlp.down_proj.weight.device.type == "meta"  # offloaded, hooks active
    return model, tok


def _windows(n: int = 4, t: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, models.TINY_VOCAB, (n, t), generator=gen)


def _same_stats(a, b) -> None:
    for kind in ("pos0", "top", "top_index", "median"):
        got, want = getattr(a, kind), getattr(b, kind)
        assert set(got) == set(want)
        for point in want:
            torch.testing.assert_close(got[point], want[point], rtol=1e-5, atol=1e-6)


def test_load_hub_places_the_model_and_asks_for_safetensors(monkeypatch, tiny_llama) -> None:
    """``load_model`` of a hub model calls from_pretrained with the pinned revision, the placement of
    ``gpu.device_map`` for its weights (one GPU when they fit, "auto" only when they need several, the host
    without CUDA), use_safetensors=True (fp32 on CPU), and leaves the dispatched model where accelerate put
    it; under a distributed launch the map is the process's own device."""
    calls: dict[str, dict] = {}
    built = tiny_llama[0]

    def fake_model(name, **kw):
        calls["model"] = {"name": name, **kw}
        built.hf_device_map = {"": "cpu"}
        return built

    def fake_tok(name, **kw):
        calls["tok"] = {"name": name, **kw}
        return tiny_llama[1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tok)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = models.get_spec("llama-3-8b")
    model, _ = models.load_model("llama-3-8b")
    assert model is built and not model.training
    assert calls["model"] == {"name": spec.hub_id, "revision": spec.revision, "dtype": torch.float32,
                              "device_map": {"": "cpu"}, "use_safetensors": True}
    assert calls["tok"] == {"name": spec.hub_id, "revision": spec.revision}
    GiB = 1024 ** 3
    for gpus, want in (([80 * GiB], {"": 0}), ([80 * GiB] * 8, {"": 0}), ([12 * GiB] * 2, "auto")):
        monkeypatch.setattr(gpu, "gpu_memory", lambda gpus=gpus: gpus)
        models.load_model("llama-3-8b", dtype=torch.bfloat16)  # 8B x 2 bytes: one 80 GB GPU; two 12 GB ones
        assert calls["model"]["device_map"] == want, gpus
    # accelerate launch / torchrun: one whole model per process, on its own GPU
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    models.load_model("llama-3-8b", dtype=torch.bfloat16)
    assert calls["model"]["device_map"] == {"": 3}


def test_dispatched_model_measures_like_the_plain_load(saved_tiny, tmp_path, monkeypatch) -> None:
    """The saved tiny-llama through ``load_model``: with the real device_map="auto" (one device here: placed,
    no hooks) its logits are the in-process model's; dispatched with offloaded layers (hf_device_map,
    accelerate's hooks), ``detection.measure`` finds the same massive layer, channels and hidden dims with the
    same statistics, and ``capture`` at every point agrees."""
    plain, tok = saved_tiny
    auto, auto_tok = models.load_model(DISK_KEY)
    ids = models.encode(tok, "tiny-llama", DETECTION_PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert auto_tok(DETECTION_PROMPTS[0])["input_ids"] == tok(DETECTION_PROMPTS[0])["input_ids"]

    model, disk_tok = _dispatched(monkeypatch, tmp_path)
    prompts = DETECTION_PROMPTS[:4]
    want = detection.measure(plain, tok, "tiny-llama", prompts, _windows())
    got = detection.measure(model, disk_tok, DISK_KEY, prompts, _windows())
    assert want.report.found and want.report.layer == models.PLANT["layer"]
    assert (got.report.layer, got.report.channels, got.report.hidden_dims) == \
        (want.report.layer, want.report.channels, want.report.hidden_dims)
    _same_stats(got.prompts, want.prompts)
    _same_stats(got.windows, want.windows)
    torch.testing.assert_close(got.contributions, want.contributions)
    ids = [models.encode(tok, "tiny-llama", p) for p in prompts]
    _same_stats(capture(model, ids, points=POINTS), capture(plain, ids, points=POINTS))


def test_zero_shot_on_a_dispatched_model_and_not_under_a_launcher(saved_tiny, tmp_path, monkeypatch) -> None:
    """lm-eval on the dispatched model (an instantiated one: batches on model.device, logits back
    there through accelerate's hooks) scores every item as on the plain model; under a distributed launch
    zero_shot refuses (every process would score every item)."""
    plain, tok = saved_tiny
    model, _ = _dispatched(monkeypatch, tmp_path)
    want = evaluation.zero_shot(plain, tok, ["commonsense"], 8, batch_size=4, prepend_bos=True)
    got = evaluation.zero_shot(model, tok, ["commonsense"], 8, batch_size=4, prepend_bos=True)
    assert got["commonsense"]["correct"] == want["commonsense"]["correct"]
    assert got["commonsense"]["scores"] == pytest.approx(want["commonsense"]["scores"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="one process"):
        evaluation.zero_shot(plain, tok, ["commonsense"], 8)


def test_cached_layer_inputs_run_an_offloaded_model(saved_tiny, tmp_path, monkeypatch) -> None:
    """``layer_inputs.LayerInputs`` holds its inputs on the host and leaves a dispatched layer's inputs to
    accelerate's hook (its weights are meta placeholders between forwards): the offloaded model's perplexity
    from every layer equals the plain model's."""
    from common.core import layer_inputs

    plain, _ = saved_tiny
    model, _ = _dispatched(monkeypatch, tmp_path)
    ids = _windows(4, 24)
    want = layer_inputs.LayerInputs(plain, ids, batch_size=2).perplexity(0)
    got = layer_inputs.LayerInputs(model, ids, batch_size=2)
    for start in range(4):
        assert got.perplexity(start) == pytest.approx(want, rel=1e-5)
