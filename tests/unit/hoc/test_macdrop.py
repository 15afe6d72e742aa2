"""MacDrop (HoC Alg. 1): schedules, the keep-mask, in-place masking of the massive up/gate rows (Linear,
fused, Conv1D, peft LoRA/DoRA), the TrainerCallback inside a stock ``transformers.Trainer``, gradient
checkpointing, refusals, ``silence_channels`` on adapters, and the cached / resumable ``finetune``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from common.core import arch, data, models
from common.core.env import cache_dir
from common.core.models import PLANT
from common.core.profiles import DETECTION_PROMPTS
from common.hoc import detection, edits, finetune
from common.hoc.macdrop import HISTORY_FILE, SCHEDULES, MacDrop, MacDropCallback, Schedule

KEY = "tiny-llama"
MAX_LEN = 128  # the byte tokenizer spends ~90 tokens on the Alpaca prompt of a synthetic pair
Z999 = 3.2905  # two-sided 99.9% normal quantile


pytestmark = pytest.mark.usefixtures("one_thread")


def _binomial_ok(rate: float, prob: float, n: int) -> bool:
    """``rate`` (a mean of n Bernoulli(prob) draws) lies inside the 99.9% normal-approximation interval."""
    return abs(rate - prob) <= Z999 * math.sqrt(prob * (1 - prob) / n) + 1e-12


def _detect(model, tok) -> tuple[int, list[int]]:
    return detection.massive_weights(model, [models.encode(tok, KEY, p) for p in DETECTION_PROMPTS], k=5)


def _settings(**kw) -> finetune.TrainSettings:
    return finetune.TrainSettings(**{"rank": 4, "alpha": 8, **kw})


def _peft(model, arm: str = "lora", seed: int = 0):
    torch.manual_seed(seed)  # LoRA A (and DoRA) initialisation
    return finetune.peft_model(model, finetune.ARMS[arm], _settings())


def _frozen(model):
    """A plain model with every parameter frozen (what a PEFT wrapper does to the base weights)."""
    model.requires_grad_(False)
    return model


def _updown(model, layer: int) -> dict[str, torch.nn.Module]:
    """The nn.Linear modules (peft: the base layers) of up_proj and gate_proj of a Llama layer."""
    mlp = arch.mlp(model, layer)
    return {n: getattr(getattr(mlp, n), "base_layer", getattr(mlp, n)) for n in ("up_proj", "gate_proj")}


def _train_set(tok, n: int) -> list[dict]:
    return data.tokenize_pairs(tok, KEY, data.instruction_pairs("synthetic", "train", n), MAX_LEN)


def _ckpt_arg() -> str:
    names = set(TrainingArguments.__dataclass_fields__)
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _trainer(model, tok, out, callbacks, max_steps: int, n: int = 8, checkpointing: bool = False, **kw) -> Trainer:
    kw = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, **kw}
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0,
                             dataloader_num_workers=0, **{_ckpt_arg(): checkpointing}, **kw)
    pad = tok.pad_token_id
    trainer = Trainer(model=model, args=args, train_dataset=_train_set(tok, n), callbacks=callbacks,
                      data_collator=lambda b: data.collate(b, pad))
    trainer.remove_callback(PrinterCallback)  # keep the per-step log out of the test output
    return trainer


def _losses(trainer: Trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


# ------------------------------------------------------------------------------------------ schedules


def test_step_schedule_is_linear_and_reaches_zero() -> None:
    """Step: p_t = p0 (1 - t/T) at every t, exactly 0 at t = T."""
    s = Schedule("step", 0.8)
    for total in (1, 7, 579):
        for t in range(1, total + 1):
            assert s.p(t, total) == pytest.approx(0.8 * (1 - t / total), abs=1e-15)
        assert s.p(total, total) == 0.0
    assert s.p(1, 4) == pytest.approx(0.6) and s.p(2, 4) == pytest.approx(0.4)


def test_exp_schedule_scales_the_paper_alpha_to_T() -> None:
    """Exp with alpha=None: alpha = 0.01 at the paper's T = 579 and alpha T = 5.79 for every T (same shape)."""
    s = Schedule("exp", 0.8)
    assert s.alpha_for(579) == pytest.approx(0.01, rel=1e-12)
    for total in (3, 10, 57, 579, 1000):
        assert s.alpha_for(total) * total == pytest.approx(5.79, rel=1e-12)
        assert s.p(total, total) / 0.8 == pytest.approx(math.exp(-5.79), rel=1e-12)
        half = total // 2 or 1
        assert s.p(half, total) == pytest.approx(0.8 * math.exp(-5.79 * half / total), rel=1e-12)


def test_exp_schedule_uses_an_explicit_alpha_as_given() -> None:
    """An explicit alpha is not rescaled by T: p_t = p0 exp(-alpha t)."""
    s = Schedule("exp", 0.5, alpha=0.3)
    for total in (5, 50):
        assert s.alpha_for(total) == 0.3
        assert s.p(4, total) == pytest.approx(0.5 * math.exp(-1.2), rel=1e-12)


def test_epoch_schedules_on_three_epochs() -> None:
    """T = 9, E = 3: steps 1-3, 4-6, 7-9 are epochs 1, 2, 3 -> before: p0, 2/3 p0, 1/3 p0; after: 2/3, 1/3, 0."""
    before, after = Schedule("epoch_before", 0.9), Schedule("epoch_after", 0.9)
    want_before = [0.9] * 3 + [0.6] * 3 + [0.3] * 3
    want_after = [0.6] * 3 + [0.3] * 3 + [0.0] * 3
    assert [before.p(t, 9, 3) for t in range(1, 10)] == pytest.approx(want_before, abs=1e-12)
    assert [after.p(t, 9, 3) for t in range(1, 10)] == pytest.approx(want_after, abs=1e-12)


def test_constant_schedule() -> None:
    """Constant: p0 at every step."""
    s = Schedule("constant", 0.35)
    assert {s.p(t, 11, 2) for t in range(1, 12)} == {0.35}


@pytest.mark.parametrize("p0", [-0.1, 1.5, float("nan")])
def test_schedule_rejects_p0_outside_unit_interval(p0: float) -> None:
    """p0 must be a probability; the message names p0."""
    with pytest.raises(ValueError, match="p0"):
        Schedule("step", p0)
    for ok in (0.0, 1.0):
        assert Schedule("step", ok).p0 == ok


def test_schedule_rejects_unknown_kind_listing_known() -> None:
    """An unknown kind raises a ValueError listing every known schedule."""
    with pytest.raises(ValueError) as err:
        Schedule("cosine", 0.8)
    assert "'cosine'" in str(err.value) and all(k in str(err.value) for k in SCHEDULES)


@pytest.mark.parametrize("step", [0, -1, 6])
def test_schedule_rejects_step_outside_1_to_T(step: int) -> None:
    """Optimizer steps are 1-based: 0 and T+1 are refused; 1 and T are fine."""
    s = Schedule("step", 0.8)
    with pytest.raises(ValueError, match="outside"):
        s.p(step, 5)
    assert s.p(1, 5) == pytest.approx(0.64) and s.p(5, 5) == 0.0


# ----------------------------------------------------------------------------------------------- mask


@pytest.fixture
def frozen_llama(tiny_llama):
    model, tok = tiny_llama
    return _frozen(model), tok


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_mask_keep_rate_is_one_minus_p(frozen_llama, p: float) -> None:
    """Pooled over 60 steps and 2 micro-batches, the keep-rate lies in the binomial 99.9% interval of 1 - p,
    and is tight enough to reject 1 - p +- 0.03; masks are 0/1 of shape (k, d)."""
    model, _ = frozen_llama
    md = MacDrop(model, PLANT["layer"], [PLANT["channel"], 3, 4, 5, 6], seed=1)
    assert md.shape == (5, model.config.hidden_size)
    masks = torch.stack([md.mask(p, step, micro) for step in range(1, 61) for micro in range(2)])
    assert masks.shape == (120, *md.shape) and set(masks.unique().tolist()) <= {0.0, 1.0}
    rate, n = float(masks.mean()), masks.numel()
    assert _binomial_ok(rate, 1 - p, n)
    assert not _binomial_ok(rate, 1 - p + 0.03, n) and not _binomial_ok(rate, 1 - p - 0.03, n)
    # every single mask has roughly the right rate too (no step-dependent bias): 320 draws each
    per_mask = masks.flatten(1).mean(1)
    assert all(abs(float(r) - (1 - p)) < 0.15 for r in per_mask)


def test_mask_extremes(frozen_llama) -> None:
    """p = 0 keeps everything, p = 1 drops everything; p outside [0, 1] is refused."""
    md = MacDrop(frozen_llama[0], PLANT["layer"], [PLANT["channel"]])
    for step in range(1, 20):
        assert torch.equal(md.mask(0.0, step), torch.ones(md.shape))
        assert torch.equal(md.mask(1.0, step), torch.zeros(md.shape))
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="outside"):
            md.mask(bad, 1)


def test_mask_is_a_function_of_seed_step_micro_index(frozen_llama) -> None:
    """Same (seed, step, micro-batch index) -> identical masks (also from a fresh MacDrop, as after a resume);
    changing any one of index, step or seed gives a different mask. (The index over processes:
    test_accelerate_launch.py.)"""
    model = frozen_llama[0]
    chans = [PLANT["channel"], 3, 4, 5, 6]
    a, b, other = MacDrop(model, 1, chans, seed=7), MacDrop(model, 1, chans, seed=7), MacDrop(model, 1, chans, seed=8)
    ref = a.mask(0.5, 3, 1)
    assert torch.equal(ref, a.mask(0.5, 3, 1)) and torch.equal(ref, b.mask(0.5, 3, 1))
    for changed in (a.mask(0.5, 3, 0), a.mask(0.5, 3, 2), a.mask(0.5, 4, 1), other.mask(0.5, 3, 1)):
        assert not torch.equal(ref, changed)


# ----------------------------------------------------------------------------------- apply / restore


def test_apply_multiplies_the_same_mask_into_up_and_gate_without_rescaling(tiny_llama) -> None:
    """On a LoRA model: after ``apply`` each massive row of up and gate (base_layer.weight) is exactly
    original * keep (kept entries bit-identical, not divided by 1 - p), zeros at the same positions in both;
    every other row, every other tensor and the adapters are untouched; the return value is the dropped share."""
    model, _ = tiny_llama
    pm = _peft(model)
    chans = [PLANT["channel"], 101, 2, 109, 179]
    with torch.no_grad():  # no exact zeros in the planted row, so every dropped entry shows as a 0
        for lin in _updown(pm, 1).values():
            row = lin.weight[PLANT["channel"]]
            row[row == 0] = 0.01
    before = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    md = MacDrop(pm, 1, chans, seed=0)
    keep = md.mask(0.5, 1)
    assert 0 < int(keep.sum()) < keep.numel()
    dropped = md.apply(keep)
    assert md.active
    assert dropped == pytest.approx(float((keep == 0).sum()) / keep.numel(), abs=1e-7)
    after = pm.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    base = "base_model.model.model.layers.1.mlp.{}.base_layer.weight"
    assert changed == {base.format("up_proj"), base.format("gate_proj")}
    others = [c for c in range(192) if c not in chans]
    for name in ("up_proj", "gate_proj"):
        w, orig = after[base.format(name)], before[base.format(name)]
        assert torch.equal(w[chans], orig[chans] * keep)
        assert torch.equal(w[chans] == 0, keep == 0)  # orig has no zeros there: zeros exactly where dropped
        assert torch.equal(w[chans][keep == 1], orig[chans][keep == 1])  # kept: no 1/(1-p) rescaling
        assert torch.equal(w[others], orig[others])
    md.restore()
    assert not md.active
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items())


def test_apply_twice_then_restore_gives_the_originals(frozen_llama) -> None:
    """A second ``apply`` without ``restore`` re-masks from the originals (not mask-on-mask), and one
    ``restore`` (idempotent) brings back bit-identical weights."""
    model = frozen_llama[0]
    lins = _updown(model, 1)
    before = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    chans = [3, 4, 5]
    md = MacDrop(model, 1, chans)
    k1, k2 = md.mask(0.5, 1), md.mask(0.5, 2)
    md.apply(k1)
    md.apply(k2)
    for n, lin in lins.items():
        assert torch.equal(lin.weight[chans], before[n][chans] * k2)
    md.restore()
    md.restore()
    for n, lin in lins.items():
        assert torch.equal(lin.weight, before[n])


def test_fused_gate_up_masks_both_halves_with_one_mask(make_tiny) -> None:
    """Phi-3 stores [gate; up] in one [2I, d] matrix (its forward does ``chunk(2)``, gate first): rows c
    and I + c both become original * keep; the logits equal those of a copy masked by hand."""
    model = _frozen(make_tiny("phi3"))
    proj = arch.mlp(model, 1).gate_up_proj
    inter = model.config.intermediate_size
    assert proj.weight.shape == (2 * inter, model.config.hidden_size)
    orig = proj.weight.detach().clone()
    chans = [3, 11, 40]
    md = MacDrop(model, 1, chans)
    keep = md.mask(0.5, 1)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        for j, c in enumerate(chans):
            manual.model.layers[1].mlp.gate_up_proj.weight[c] *= keep[j]
            manual.model.layers[1].mlp.gate_up_proj.weight[inter + c] *= keep[j]
    md.apply(keep)
    w = proj.weight
    for j, c in enumerate(chans):
        assert torch.equal(w[c], orig[c] * keep[j]) and torch.equal(w[inter + c], orig[inter + c] * keep[j])
    rest = [r for r in range(2 * inter) if r not in chans and r - inter not in chans]
    assert torch.equal(w[rest], orig[rest])
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, manual(input_ids=ids).logits)
        md.restore()
        assert not torch.equal(model(input_ids=ids).logits, manual(input_ids=ids).logits)
    assert torch.equal(proj.weight, orig)


def test_conv1d_masks_columns_with_the_transposed_mask(make_tiny) -> None:
    """GPT-2's c_fc is a Conv1D with weight [in = d, out = 4d]: channel c is *column* c, so column c_j
    becomes original[:, c_j] * keep[j]; rows of hidden dims and the bias are untouched."""
    model = _frozen(make_tiny("gpt2"))
    c_fc = model.transformer.h[1].mlp.c_fc
    d = model.config.n_embd
    assert c_fc.weight.shape == (d, 4 * d)
    orig, bias = c_fc.weight.detach().clone(), c_fc.bias.detach().clone()
    chans = [5, 17, 100]
    md = MacDrop(model, 1, chans)
    assert md.shape == (3, d)
    keep = md.mask(0.5, 2)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        for j, c in enumerate(chans):
            manual.transformer.h[1].mlp.c_fc.weight[:, c] *= keep[j]
    md.apply(keep)
    for j, c in enumerate(chans):
        assert torch.equal(c_fc.weight[:, c], orig[:, c] * keep[j])
    rest = [c for c in range(4 * d) if c not in chans]
    assert torch.equal(c_fc.weight[:, rest], orig[:, rest]) and torch.equal(c_fc.bias, bias)
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, manual(input_ids=ids).logits)
    md.restore()
    assert torch.equal(c_fc.weight, orig)


# ------------------------------------------------------------------------------- inside the Trainer


class _Checker(TrainerCallback):
    """Test-only callback placed after MacDrop's: records what the forward passes saw (hooks on the base
    up/gate layers) and the state of weights and gradients at each callback event."""

    def __init__(self, model, layer: int, chans: list[int]):
        self.model, self.chans = model, chans
        self.lins = _updown(model, layer)
        self.orig = {n: lin.weight.detach().clone() for n, lin in self.lins.items()}
        self.forwards: list[dict[str, torch.Tensor]] = []  # per forward call: dropped-entry pattern per proj
        self.per_step: list[list[dict[str, torch.Tensor]]] = []
        self.restored_at_step_end: list[bool] = []
        self.restored_at_pre_opt: list[bool] = []
        self.grads: list[dict] = []
        for n, lin in self.lins.items():
            lin.register_forward_pre_hook(lambda mod, _a, n=n: self._seen(n, mod.weight))

    def _seen(self, name: str, w: torch.Tensor) -> None:
        rows, orig = w.detach()[self.chans], self.orig[name][self.chans]
        assert bool(((rows == orig) | (rows == 0)).all()), "masked rows must be original or 0 (no rescaling)"
        if not self.forwards or name in self.forwards[-1]:  # LlamaMLP calls gate_proj, then up_proj
            self.forwards.append({})
        self.forwards[-1][name] = rows == 0

    def _base_equal(self) -> bool:
        return all(torch.equal(lin.weight, self.orig[n]) for n, lin in self.lins.items())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.restored_at_pre_opt.append(self._base_equal())
        named = dict(self.model.named_parameters())
        self.grads.append({
            "lora_A": [p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in named.items() if "lora_A" in n],
            "lora_B": [p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in named.items() if "lora_B" in n],
            "base_grad_none": all(p.grad is None for n, p in named.items() if "lora_" not in n),
        })
        self.per_step.append(self.forwards)
        self.forwards = []

    def on_step_end(self, args, state, control, **kwargs):
        self.restored_at_step_end.append(self._base_equal())


@pytest.fixture
def lora_llama(tiny_llama):
    """tiny-llama wrapped in LoRA, its detected massive layer/channels, with any exact zeros of those rows
    replaced by 0.01 (so every dropped entry of the massive rows is visible as an exact 0)."""
    model, tok = tiny_llama
    layer, chans = _detect(model, tok)
    pm = _peft(model)
    with torch.no_grad():
        for lin in _updown(pm, layer).values():
            w = lin.weight[chans]
            lin.weight[chans] = torch.where(w == 0, torch.full_like(w, 0.01), w)
    return pm, tok, layer, chans


def test_massive_weights_finds_the_plant_and_refuses_gpt2(tiny_llama, tiny_gpt2) -> None:
    """Detection for MacDrop: tiny-llama -> PLANT's layer with PLANT's channel ranked first; tiny-gpt2 (nothing
    planted) -> ValueError 'no massive layer'."""
    layer, chans = _detect(*tiny_llama)
    assert layer == PLANT["layer"] and chans[0] == PLANT["channel"] and len(set(chans)) == 5
    model, tok = tiny_gpt2
    with pytest.raises(ValueError, match="no massive layer"):
        detection.massive_weights(model, [models.encode(tok, "tiny-gpt2", p) for p in DETECTION_PROMPTS], k=5)


def test_callback_masks_each_micro_batch_and_restores_in_the_trainer(lora_llama, tmp_path) -> None:
    """Stock Trainer, LoRA, p0 = 0.8 Step, T = 4, 2 micro-batches per step: (a) every micro-batch forward sees
    the massive rows of up and gate masked with one shared pattern, fresh per micro-batch, none at p_T = 0;
    (b) at on_step_end the base rows are bit-identical to the originals; (c) at on_pre_optimizer_step they are
    restored, LoRA grads exist and are non-zero, base weights have no grad; (d) ``history`` has one entry per
    step with p_t = p0 (1 - t/T) and the drop rate the forwards actually saw."""
    pm, tok, layer, chans = lora_llama
    md_cb = MacDropCallback(pm, layer, chans, p0=0.8, schedule="step", seed=0)
    checker = _Checker(pm, layer, chans)
    trainer = _trainer(pm, tok, tmp_path, [md_cb, checker], max_steps=4)
    trainer.train()
    total = 4
    # (a) masked forwards: two per optimizer step, up/gate share the pattern, fresh per micro-batch
    assert len(checker.per_step) == total and all(len(s) == 2 for s in checker.per_step)
    observed = []
    for t, step in enumerate(checker.per_step, start=1):
        for fwd in step:
            assert torch.equal(fwd["up_proj"], fwd["gate_proj"])
        rates = [float(f["up_proj"].float().mean()) for f in step]
        observed.append(sum(rates) / 2)
        if t < total:
            assert min(rates) > 0
            assert not torch.equal(step[0]["up_proj"], step[1]["up_proj"])
        else:
            assert max(rates) == 0  # p_T = 0
    # (b) + (c)
    assert checker.restored_at_step_end == [True] * total
    assert checker.restored_at_pre_opt == [True] * total
    for t, g in enumerate(checker.grads, start=1):
        assert g["lora_B"] and all(g["lora_B"]) and g["base_grad_none"]
        if t > 1:  # at step 1 lora_B = 0, so d loss / d lora_A = 0 by construction
            assert all(g["lora_A"])
    assert checker._base_equal() and not md_cb.macdrop.active
    # (d) history
    hist = md_cb.history
    assert [h["step"] for h in hist] == list(range(1, total + 1))
    n = 2 * len(chans) * pm.config.hidden_size
    for t, h in enumerate(hist, start=1):
        p = 0.8 * (1 - t / total)
        assert h["p"] == pytest.approx(p, abs=1e-12)
        assert h["drop_rate"] == pytest.approx(observed[t - 1], abs=1e-6)
        assert h["drop_rate"] == 0 if t == total else _binomial_ok(h["drop_rate"], p, n)


def test_epoch_schedule_follows_the_trainers_epochs(lora_llama, tmp_path) -> None:
    """Two epochs of 2 optimizer steps: epoch_before with p0 = 0.6 gives p = 0.6, 0.6, 0.3, 0.3 (the callback
    reads T and E from the Trainer's state) and the measured drop rates follow."""
    pm, tok, layer, chans = lora_llama
    cb = MacDropCallback(pm, layer, chans, p0=0.6, schedule="epoch_before")
    _trainer(pm, tok, tmp_path, [cb], max_steps=-1, num_train_epochs=2).train()
    assert [h["step"] for h in cb.history] == [1, 2, 3, 4]
    assert [h["p"] for h in cb.history] == pytest.approx([0.6, 0.6, 0.3, 0.3], abs=1e-12)
    n = 2 * len(chans) * pm.config.hidden_size
    assert all(_binomial_ok(h["drop_rate"], h["p"], n) for h in cb.history)


def test_epoch_schedule_when_max_steps_ends_inside_an_epoch(lora_llama, tmp_path) -> None:
    """4 optimizer steps per epoch, max_steps = 6 (the Trainer runs epoch 1 = steps 1-4, epoch 2 = steps 5-6):
    epoch_before with p0 = 0.6 must give p0 for the 4 steps of epoch 1 and p0/2 for steps 5-6. The epochs the
    Trainer reports (``state.epoch`` at each step's start) are recorded as the independent reference."""
    pm, tok, layer, chans = lora_llama
    cb = MacDropCallback(pm, layer, chans, p0=0.6, schedule="epoch_before")
    epochs: list[float] = []

    class Epochs(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            epochs.append(state.epoch)

    trainer = _trainer(pm, tok, tmp_path, [cb, Epochs()], max_steps=6, gradient_accumulation_steps=1)
    trainer.train()
    assert trainer.state.num_train_epochs == 2
    assert [math.floor(e) + 1 for e in epochs] == [1, 1, 1, 1, 2, 2]  # the Trainer's epoch of steps 1..6
    assert [h["p"] for h in cb.history] == pytest.approx([0.6] * 4 + [0.3] * 2, abs=1e-12)


def test_finetune_plain_lora_has_no_macdrop_history(tiny_llama) -> None:
    """The plain ``lora`` arm needs no massive layer (layer=None is accepted) and records no MacDrop history."""
    tok = tiny_llama[1]
    settings = _settings(epochs=1, batch_size=2, grad_accum=1, max_len=MAX_LEN, save_steps=100)
    result = finetune.finetune(KEY, finetune.ARMS["lora"], 0, settings, _train_set(tok, 4), None, [])
    assert result.steps == 2 and [e["step"] for e in result.log] == [1, 2] and result.macdrop == []
    assert (result.path / "COMPLETE").exists()


def test_finetune_frees_the_trained_model(tiny_llama, monkeypatch) -> None:
    """Back-to-back fine-tunes (notebook 03 runs up to 43) must not pile up models: once ``finetune`` returns,
    the model it trained is gone, also with bf16, where accelerate's autocast wrapper of ``forward`` makes a
    reference cycle. The collector is off during the run, so only the library's own cleanup can free it."""
    import gc
    import weakref

    tok = tiny_llama[1]
    refs = []
    load = models.load_model

    def spy(*args, **kwargs):
        model, t = load(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, t

    monkeypatch.setattr(finetune.models, "load_model", spy)
    settings = _settings(epochs=1, batch_size=2, grad_accum=1, max_len=MAX_LEN, save_steps=100, bf16=True)
    gc.collect()
    gc.disable()
    try:
        result = finetune.finetune(KEY, finetune.ARMS["lora"], 0, settings, _train_set(tok, 4), None, [])
        assert result.steps == 2 and len(refs) == 1
        assert refs[0]() is None
    finally:
        gc.enable()


def test_p0_zero_trains_exactly_like_no_callback(tiny_llama, tmp_path) -> None:
    """MacDrop with p0 = 0 is a no-op: same per-step losses as training without it (same seed); p0 = 0.8
    constant changes them (the comparison can tell)."""
    model, tok = tiny_llama
    layer, chans = _detect(model, tok)

    def run(p0: float | None, sub: str) -> list[float]:
        pm = _peft(models.load_model(KEY)[0])
        cbs = [] if p0 is None else [MacDropCallback(pm, layer, chans, p0=p0, schedule="constant")]
        trainer = _trainer(pm, tok, tmp_path / sub, cbs, max_steps=3)
        trainer.train()
        return _losses(trainer)

    plain, zero, dropped = run(None, "a"), run(0.0, "b"), run(0.8, "c")
    assert len(plain) == 3 and plain == zero
    assert dropped != plain


def test_gradient_checkpointing_recomputes_with_the_same_mask(tiny_llama, tmp_path) -> None:
    """One optimizer step (2 micro-batches), p0 = 0.5 constant: LoRA gradients with activation checkpointing
    equal those without; the recomputation (a second forward per micro-batch) saw masked rows; p0 = 0 gives
    different gradients (the comparison can tell)."""
    model, tok = tiny_llama
    layer, chans = _detect(model, tok)

    def run(checkpointing: bool, p0: float, sub: str):
        pm = _peft(models.load_model(KEY)[0])
        checker = _Checker(pm, layer, chans)
        grads = {}

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                grads.update(_lora_grads(pm))

        cb = MacDropCallback(pm, layer, chans, p0=p0, schedule="constant")
        trainer = _trainer(pm, tok, tmp_path / sub, [cb, checker, Grab()], max_steps=1, checkpointing=checkpointing,
                           max_grad_norm=0.0)
        trainer.train()
        return grads, checker.per_step[0], trainer

    off, fwd_off, _ = run(False, 0.5, "off")
    on, fwd_on, trainer = run(True, 0.5, "on")
    base = arch.unwrap(trainer.model)
    assert getattr(base, "is_activation_checkpointing", None) or getattr(base, "is_gradient_checkpointing", False)
    assert len(fwd_off) == 2 and len(fwd_on) == 4  # checkpointing re-runs each micro-batch's forward
    assert all(float(f["up_proj"].float().mean()) > 0 for f in fwd_on)
    # forward i and its recomputation used the same pattern
    assert torch.equal(fwd_on[0]["up_proj"], fwd_on[1]["up_proj"]) and torch.equal(fwd_on[2]["up_proj"],
                                                                                      fwd_on[3]["up_proj"])
    assert set(on) == set(off) and len(on) > 0
    assert any(float(g.abs().sum()) > 0 for g in on.values())
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-7)
    unmasked, _, _ = run(True, 0.0, "p0")
    assert any(not torch.allclose(unmasked[n], on[n], rtol=1e-4, atol=1e-7) for n in on)


def test_dora_norm_sees_the_masked_base_weight_and_is_restored(tiny_llama, tmp_path) -> None:
    """DoRA (``dora_macdrop``'s wrapping): the weight DoRA's column norm is computed from is the masked
    base_layer.weight (zeros in the massive rows during training), and the base weights are bit-identical
    after training."""
    model, tok = tiny_llama
    layer, chans = _detect(model, tok)
    pm = _peft(model, "dora_macdrop")
    mlp = arch.mlp(pm, layer)
    orig = {n: getattr(mlp, n).base_layer.weight.detach().clone() for n in ("up_proj", "gate_proj")}
    seen: dict[str, list[float]] = {"up_proj": [], "gate_proj": []}
    for name in seen:
        dora = getattr(mlp, name).lora_magnitude_vector["default"]
        real = dora.get_weight_norm

        def spy(weight, lora_weight, scaling, adapter_name=None, real=real, name=name):
            rows, ref = weight.detach()[chans], orig[name][chans]
            seen[name].append(float(((rows == 0) & (ref != 0)).float().sum() / (ref != 0).sum()))
            return real(weight, lora_weight, scaling, adapter_name=adapter_name)

        dora.get_weight_norm = spy
    arm = finetune.ARMS["dora_macdrop"]
    cb = MacDropCallback(pm, layer, chans, schedule=arm.schedule)
    assert arm.dora and arm.schedule == Schedule("step", 0.8)
    _trainer(pm, tok, tmp_path, [cb], max_steps=3).train()
    for name in seen:
        assert len(seen[name]) == 6  # 3 steps x 2 micro-batches
        assert all(r > 0 for r in seen[name][:4])  # p = 0.53, 0.27 in steps 1 and 2
        assert all(r == 0 for r in seen[name][4:])  # p_T = 0
        assert torch.equal(getattr(mlp, name).base_layer.weight, orig[name])


# ------------------------------------------------------------------------------------------- refusals


def test_refuses_bad_layer_channels_and_k(frozen_llama) -> None:
    """k above the intermediate size, a layer outside the model, duplicate or out-of-range channels."""
    model = frozen_llama[0]
    with pytest.raises(ValueError, match="192"):
        MacDrop(model, 1, list(range(193)))
    for layer in (4, -1):
        with pytest.raises(ValueError, match="outside"):
            MacDrop(model, layer, [3])
    with pytest.raises(ValueError, match="distinct"):
        MacDrop(model, 1, [37, 37])
    for bad in ([192], [-1], []):
        with pytest.raises(ValueError):
            MacDrop(model, 1, bad)
    assert MacDrop(model, 3, list(range(192))).shape == (192, 64)  # the limits themselves are fine


def test_refuses_trainable_base_weights(tiny_llama) -> None:
    """A model without a PEFT wrapper (base weights require grad) is refused with a hint about freezing /
    adapters; the same model frozen is accepted."""
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"(?s)frozen.*adapter"):
        MacDropCallback(model, 1, [37])
    MacDropCallback(_frozen(model), 1, [37])


def test_refuses_merged_adapter(tiny_llama) -> None:
    """A peft model whose adapters are merged into the base weights is refused; unmerged it is accepted."""
    pm = _peft(tiny_llama[0])
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        MacDrop(pm, 1, [37])
    pm.unmerge_adapter()
    MacDrop(pm, 1, [37])


def test_refuses_non_float_weight(frozen_llama) -> None:
    """An integer (quantised-like) base weight raises TypeError; the float weight it replaced was accepted."""
    model = frozen_llama[0]
    MacDrop(model, 1, [37])
    up = arch.mlp(model, 1).up_proj
    up.weight = torch.nn.Parameter(torch.zeros(up.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point"):
        MacDrop(model, 1, [37])


def test_dora_refuses_a_fully_dropped_row(tiny_llama) -> None:
    """Under DoRA a fully dropped row would make the weight norm 0 and the output NaN (shown by zeroing a row by
    hand), so ``apply`` refuses an all-zero mask row; LoRA accepts it, and DoRA accepts a partial mask."""
    model, tok = tiny_llama
    pm = _peft(model, "dora_macdrop").eval()
    ids = models.encode(tok, KEY, "Summer is warm.")
    up = arch.mlp(pm, 1).up_proj.base_layer
    saved = up.weight[5].detach().clone()
    with torch.no_grad():
        up.weight[5] = 0
        assert torch.isnan(pm(input_ids=ids).logits).any()
        up.weight[5] = saved
    md = MacDrop(pm, 1, [5, 6])
    with pytest.raises(ValueError, match="DoRA"):
        md.apply(md.mask(1.0, 1))
    assert not md.active and torch.equal(up.weight[5], saved)
    md.apply(md.mask(0.5, 1))
    md.restore()
    lora = MacDrop(_peft(models.load_model(KEY)[0]), 1, [5, 6])
    assert lora.apply(lora.mask(1.0, 1)) == 1.0
    lora.restore()


def test_finetune_macdrop_arm_needs_a_layer_and_arm_scope_is_checked(tiny_llama) -> None:
    """A MacDrop arm without a massive layer is refused before any training; an unknown scope too."""
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="no massive layer"):
        finetune.finetune(KEY, finetune.ARMS["lora_macdrop"], 0, _settings(), _train_set(tok, 2), None, [])
    assert not (cache_dir() / "finetune").exists()
    with pytest.raises(ValueError, match="bogus"):
        finetune.Arm("x", scope="bogus")
    for scope in finetune.SCOPES:
        assert finetune.Arm("x", scope=scope).scope == scope


# ------------------------------------------------------------------------------ scope, silence on peft


def test_scope_channels() -> None:
    """massive -> the channels; all -> every row; non_massive -> every row except the channels."""
    chans = [7, 2, 30]
    assert finetune.scope_channels(finetune.Arm("a", scope="massive"), chans, 40) == [7, 2, 30]
    assert finetune.scope_channels(finetune.Arm("a", scope="all"), chans, 40) == list(range(40))
    rest = finetune.scope_channels(finetune.Arm("a", scope="non_massive"), chans, 40)
    assert sorted(rest) == [c for c in range(40) if c not in (2, 7, 30)] and len(rest) == 37


def test_silence_channels_on_lora_equals_merge_then_zero(tiny_llama) -> None:
    """With non-zero LoRA B, silencing the channels at down_proj's input equals merging the adapter and
    zeroing the merged up/gate rows; zeroing the *base* rows of the unmerged model does not (the adapter
    still writes the channel)."""
    model, tok = tiny_llama
    pm = _peft(model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    chans = {PLANT["layer"]: [PLANT["channel"], 2, 101], 2: [5, 9]}
    ids = models.encode(tok, KEY, "Summer is warm. Winter is cold.")
    with torch.no_grad():
        plain = pm(input_ids=ids).logits
        with edits.silence_channels(pm, chans):
            silenced = pm(input_ids=ids).logits
        merged = copy.deepcopy(pm).merge_and_unload()
        with edits.zero_channels(merged, chans):
            merged_zero = merged(input_ids=ids).logits
        with edits.zero_channels(pm, chans):
            base_zero = pm(input_ids=ids).logits
    torch.testing.assert_close(silenced, merged_zero, rtol=1e-4, atol=1e-4)
    assert (silenced - plain).abs().max() > 1e-2
    assert (base_zero - merged_zero).abs().max() > 1e-2


# ---------------------------------------------------------------------------------- cached finetune


class _Interrupt(Exception):
    pass


def test_finetune_end_to_end_cache_and_resume(tiny_llama, monkeypatch) -> None:
    """lora_macdrop on tiny-llama, 8 examples, batch 2, 1 epoch = 4 steps, checkpoints every 2 steps:
    an interrupted first call leaves checkpoint-2 with MacDrop's history; the next call resumes (runs only
    steps 3-4) and reports every step; a third call returns the cached result without training; the
    tuned adapter changes the logits."""
    model, tok = tiny_llama
    layer, chans = _detect(model, tok)
    train = _train_set(tok, 8)
    settings = _settings(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_len=MAX_LEN, save_steps=2)
    arm = finetune.ARMS["lora_macdrop"]
    ended: list[int] = []
    default_cache = cache_dir()
    monkeypatch.setenv("REPRO_CACHE", str(default_cache.parent / "uninterrupted"))
    reference = finetune.finetune(KEY, arm, 0, settings, train, layer, chans)
    monkeypatch.setenv("REPRO_CACHE", str(default_cache))
    assert cache_dir() == default_cache and not (default_cache / "finetune").exists()

    def stop_after_3(self, args, state, control, **kwargs):
        ended.append(state.global_step)
        if state.global_step == 3:
            raise _Interrupt

    with monkeypatch.context() as m:
        m.setattr(finetune.MacDropCallback, "on_step_end", stop_after_3, raising=False)
        with pytest.raises(_Interrupt):
            finetune.finetune(KEY, arm, 0, settings, train, layer, chans)
    assert ended == [1, 2, 3]
    works = list((cache_dir() / "finetune").glob("*.work"))
    assert len(works) == 1 and not list((cache_dir() / "finetune").glob("*/COMPLETE"))
    ckpt = works[0] / "checkpoint-2"
    saved = json.loads((ckpt / HISTORY_FILE).read_text())
    assert [h["step"] for h in saved] == [1, 2]

    ended.clear()
    with monkeypatch.context() as m:
        m.setattr(finetune.MacDropCallback, "on_step_end", lambda self, a, s, c, **k: ended.append(s.global_step),
                  raising=False)
        result = finetune.finetune(KEY, arm, 0, settings, train, layer, chans)
    assert ended == [3, 4]  # resumed, not restarted
    assert result.steps == 4
    assert [e["step"] for e in result.log] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in result.log)
    assert [h["step"] for h in result.macdrop] == [1, 2, 3, 4]
    assert result.macdrop[:2] == saved
    for h in result.macdrop:
        assert h["p"] == pytest.approx(0.8 * (1 - h["step"] / 4), abs=1e-12)
    assert (result.path / "COMPLETE").exists() and not works[0].exists()
    # the resumed run is the uninterrupted run: same masks (seeded by step), losses and adapter
    assert result.macdrop == reference.macdrop and result.steps == reference.steps
    assert [e["loss"] for e in result.log] == pytest.approx([e["loss"] for e in reference.log], rel=1e-5)
    got, want = (load_file(r.path / "adapter_model.safetensors") for r in (result, reference))
    assert set(got) == set(want) and any(float(v.abs().sum()) > 0 for k, v in got.items() if "lora_B" in k)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)

    def no_training(*a, **k):
        raise AssertionError("a cached run must not train again")

    monkeypatch.setattr(finetune, "_train", no_training)
    cached = finetune.finetune(KEY, arm, 0, settings, train, layer, chans)
    assert (cached.path, cached.log, cached.macdrop, cached.steps) == (result.path, result.log, result.macdrop, 4)

    tuned, _ = finetune.load_tuned(KEY, cached)
    ids = models.encode(tok, KEY, "### Instruction:\nFinish the sentence: The river was built")
    with torch.no_grad():
        diff = (tuned(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
        with tuned.disable_adapter():
            same = (tuned(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert diff > 1e-4 and same == 0
