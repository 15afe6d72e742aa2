"""Inheritune's compact GPT (``common.inheritune.gpt``), the paper values notebook 04 reads, and the trainer /
inheritance / growth (``common.inheritune.training``): attention implementations and the inverse-layer logit
scaling, tied embeddings and init, the LR schedule, the optimizer's decay groups, deterministic batches (one
process or a share of them) and validation windows, training (learns, caches, resumes bit-identically),
``inherit`` / ``grow`` / ``paired_difference``, the end-to-end experiment with its manifest records and acceptance
readings, and ``data.token_stream``. Tiny models on CPU; nothing is written into the repo."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import matplotlib
import pytest
import torch
import torch.nn.functional as F

from common.core import arch, data, evaluation, manifest, profiles, progress, timeplan
from common.core.gpu import Shape
from common.core.profiles import GPTConfig, PretrainSettings
from common.inheritune import paper, results, training
from common.inheritune.attention import capture_attention
from common.inheritune.gpt import GPT
from common.inheritune.training import Run
from common.reporting import session


def test_paper_values_are_the_papers() -> None:
    """The numbers claims.yaml and the records read (Inheritune v4 Table 5, Fig. 3, Fig. 14), all at half depth."""
    assert paper.VAL_LOSS["reference"][0] == 2.81 and paper.VAL_LOSS["inherit_first"][0] == 2.87
    assert paper.VAL_LOSS["random"][0] is None and paper.VAL_LOSS["random_2x"][0] is None  # no 12L runs in Table 5
    assert paper.GROWTH_VAL_LOSS == [2.87, 2.84, 2.81]
    assert paper.HALF_DEPTH_MINUS_REFERENCE == {"gpt2-medium": 0.06, "gpt2-large": -0.05, "gpt2-xl": -0.01}
    assert paper.INHERIT_FIRST_MINUS_REFERENCE == 0.06 and paper.GROWN_MINUS_REFERENCE == 0.0
    assert paper.INHERIT_FIRST_MINUS_RANDOM_2X == -0.04 and paper.GROWN_MINUS_RANDOM_2X == -0.02
    assert paper.HALF_DEPTH_MINUS_RANDOM["gpt2-medium"] is None and paper.HALF_DEPTH_MINUS_RANDOM["gpt2-large"] == -0.17
    assert paper.FIG3_FIRST_MINUS_RANDOM_10K["gpt2-medium"] == -0.27
    assert paper.AVGMASS_LAST_OVER_FIRST_THIRD == pytest.approx(1.725 / 15.375)
    assert paper.N_LAZY_LAYERS["gpt2-medium"] == 14
    assert len(paper.MAXRANK["gpt2-medium"]) == len(paper.AVGMASS["gpt2-medium"]) == 24
    assert len(paper.MAXRANK["gpt2-large"]) == len(paper.AVGMASS["gpt2-large"]) == 36


matplotlib.use("Agg")


LN256 = math.log(256)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(n_layer: int = 2, n_embd: int = 16, block: int = 16, n_head: int = 2, **kw) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, **kw)


def _settings(**kw) -> PretrainSettings:
    base = {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup": 2, "eval_interval": 3, "ckpt_interval": 100,
            "n_val": 4}
    return PretrainSettings(**{**base, **kw})


def _pattern(n: int = 1400) -> torch.Tensor:
    """A learnable stream: the bytes of "abcdefg" repeated (each byte determines the next)."""
    return torch.tensor(list(b"abcdefg") * (n // 7), dtype=torch.uint8)


def _noise(n: int, seed: int) -> torch.Tensor:
    """An unlearnable stream: i.i.d. uniform bytes."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on ``training.train_batch``: the list of steps it was asked for (one per optimizer micro-step)."""
    calls: list[int] = []
    real = training.train_batch

    def spy(stream, step, *args, **kw):
        calls.append(step)
        return real(stream, step, *args, **kw)

    monkeypatch.setattr(training, "train_batch", spy)
    return calls


def _run(name: str, n_layer: int, losses: list[float], steps: int = 20, curve=None) -> Run:
    return Run(name, n_layer, steps, curve or [(0, 5.0), (steps, losses[0])], losses, tokens_per_s=1.0,
               seconds=1.0, n_params=1, init={})


# ------------------------------------------------------------------------------------------------- GPT


def _attn_probs(model: GPT, ids: torch.Tensor) -> list[torch.Tensor | None]:
    """Each attention module's second output (the probabilities, or None), read by forward hooks."""
    store: list[torch.Tensor | None] = [None] * model.config.n_layer
    handles = [arch.attention(model, i).register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, out[1]))
               for i in range(model.config.n_layer)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return store


def _sharpened(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose q/k/v weights are 15x the init, so attention is far from uniform."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(15)
    return model


def _hand_probs(attn, x: torch.Tensor, divisor: float) -> torch.Tensor:
    """Causal softmax of q k^T / sqrt(d_head) / divisor from the c_attn weight rows (q, k, v stacked)."""
    b, t, d = x.shape
    h = attn.cfg.n_head
    w = attn.c_attn.weight
    q = (x @ w[:d].T).view(b, t, h, d // h).transpose(1, 2)
    k = (x @ w[d:2 * d].T).view(b, t, h, d // h).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // h) / divisor
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return logits.where(keep, torch.tensor(float("-inf"))).softmax(-1)


def test_eager_and_sdpa_agree_and_eager_probabilities_are_causal() -> None:
    """Both attention implementations give the same logits; only eager returns probabilities, and those are
    row-stochastic, exactly zero above the diagonal, and not uniform (the check below has something to see)."""
    model = _sharpened(_cfg(n_layer=3, n_embd=32, n_head=4))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa = model(ids).logits
    assert _attn_probs(model, ids) == [None, None, None]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
    assert torch.allclose(eager, sdpa, rtol=1e-4, atol=1e-6)
    for p in _attn_probs(model, ids):
        assert p.shape == (2, 4, 16, 16)
        assert torch.allclose(p.sum(-1), torch.ones(2, 4, 16), atol=1e-5)
        assert torch.all(p.triu(1) == 0)
        assert torch.all(p[..., torch.tril(torch.ones(16, 16, dtype=torch.bool))] > 0)
        assert float(p[..., 4:, :].max()) > 0.5  # sharp rows exist: uniform rows of length >= 5 would be <= 0.2
    with pytest.raises(ValueError, match="flash"):
        model.set_attn_implementation("flash")


def test_inverse_layer_scaling_divides_layer_i_logits_by_i_plus_one() -> None:
    """With the flag, layer i's attention logits are q k^T / sqrt(d_head) / (i + 1) (hand-computed from
    c_attn); without it, every layer uses 1 / sqrt(d_head). Same weights: layer 0 is unchanged by the flag,
    layers 1 and 2 change."""
    cfg = _cfg(n_layer=3, n_embd=32, n_head=4, scale_attn_by_inverse_layer_idx=True)
    scaled = _sharpened(cfg)
    plain = GPT(replace(cfg, scale_attn_by_inverse_layer_idx=False)).eval()
    plain.load_state_dict(scaled.state_dict())
    for m in (scaled, plain):
        m.set_attn_implementation("eager")
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in range(3):
            _, p_scaled = scaled.transformer.h[i].attn(x)
            _, p_plain = plain.transformer.h[i].attn(x)
            attn = scaled.transformer.h[i].attn
            assert torch.allclose(p_scaled, _hand_probs(attn, x, i + 1), atol=1e-6)
            assert torch.allclose(p_plain, _hand_probs(attn, x, 1), atol=1e-6)
            if i == 0:
                assert torch.equal(p_scaled, p_plain)
            else:
                assert float((p_scaled - p_plain).abs().max()) > 1e-2


def test_tied_embeddings_no_biases_and_parameter_count() -> None:
    """The LM head *is* the token embedding; no module has a bias; n_params counts the tied matrix once:
    V d + T d + L (12 d^2 + 2 d) + d (q/k/v 3d^2, proj d^2, MLP 8 d^2, two LayerNorm gains; final LN)."""
    cfg = _cfg(n_layer=3, n_embd=16, block=8, vocab_size=50)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert all(getattr(m, "bias", None) is None for m in model.modules())
    v, t, d, n = 50, 8, 16, 3
    want = v * d + t * d + n * (12 * d * d + 2 * d) + d
    assert model.n_params() == want
    # counting every state-dict entry would count the tied matrix twice
    assert sum(x.numel() for x in model.state_dict().values()) == want + v * d


def test_residual_projections_use_scaled_init() -> None:
    """Every ``*c_proj.weight`` has std 0.02 / sqrt(2 n_layer) (GPT-2's scaled init); the other matrices
    and the embeddings keep 0.02; LayerNorm gains are 1. Loose (3%) statistical check on a 256-wide model."""
    torch.manual_seed(0)
    model = GPT(_cfg(n_layer=4, n_embd=256, n_head=4, block=32))
    scaled = 0.02 / math.sqrt(8)
    names = {name for name, _ in model.named_parameters()}
    assert sum(name.endswith("c_proj.weight") for name in names) == 8  # attn and MLP, 4 layers
    for name, p in model.named_parameters():
        p = p.detach()
        if p.dim() < 2:
            assert torch.all(p == 1), name
            continue
        want = scaled if name.endswith("c_proj.weight") else 0.02
        assert float(p.std()) == pytest.approx(want, rel=0.03), name
        assert abs(float(p.mean())) < 0.1 * want, name


def test_labels_loss_is_mean_cross_entropy_and_shape_errors() -> None:
    """``labels`` gives the mean token cross-entropy of the logits (hand log-softmax); T > block_size raises
    (T = block_size works); n_embd not divisible by n_head and zero sizes raise."""
    torch.manual_seed(0)
    model = GPT(_cfg(block=8))
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, 256, (3, 8), generator=g), torch.randint(0, 256, (3, 8), generator=g)
    with torch.no_grad():
        out = model(ids, labels=labels)
        assert model(ids).loss is None
    logp = out.logits.log_softmax(-1)
    hand = -logp.gather(-1, labels[..., None]).mean()
    assert float(out.loss) == pytest.approx(float(hand), rel=1e-6)
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(out.logits.reshape(-1, 256), labels.reshape(-1))),
                                            rel=1e-6)
    assert out.logits.shape == (3, 8, 256)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=">= 1"):
        GPTConfig(n_layer=0)


def test_arch_accessors_and_perplexity_work_on_the_gpt() -> None:
    """``common.core.arch`` reaches the GPT's blocks and attention modules, and ``evaluation.perplexity`` (batched
    unevenly) equals exp of the mean next-token NLL computed by hand."""
    torch.manual_seed(0)
    model = GPT(_cfg(n_layer=3, block=12)).eval()
    assert len(arch.layers(model)) == 3 and arch.layers(model) is model.transformer.h
    assert all(arch.attention(model, i) is model.transformer.h[i].attn for i in range(3))
    assert arch.backbone(model) is model.transformer
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logp = model(windows).logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean()
    assert evaluation.perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(float(nll)), rel=1e-5)


# -------------------------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_peak_and_cosine_floor() -> None:
    """lr (s+1)/W during warmup, the peak at the end of warmup, cosine halfway value (lr + low)/2 at the
    middle of the decay, the floor min_lr_ratio x lr at the end of the schedule (and after), and never
    increasing once warmup is over."""
    s = _settings(lr=0.01, warmup=4, steps=20, min_lr_ratio=0.1)
    low = 0.001
    for step in range(4):
        assert training.lr_at(step, s) == pytest.approx(0.01 * (step + 1) / 4, rel=1e-12)
    assert training.lr_at(3, s) == pytest.approx(0.01) and training.lr_at(4, s) == pytest.approx(0.01)
    assert training.lr_at(12, s) == pytest.approx((0.01 + low) / 2, rel=1e-12)  # progress (12-4)/16 = 1/2
    assert training.lr_at(8, s) == pytest.approx(low + 0.5 * (1 + math.cos(math.pi / 4)) * (0.01 - low), rel=1e-12)
    assert training.lr_at(20, s) == pytest.approx(low, rel=1e-12)
    assert training.lr_at(25, s) == pytest.approx(low, rel=1e-12)
    # the last optimizer step (19) sits one step short of the floor: progress 15/16
    assert training.lr_at(19, s) == pytest.approx(low + 0.5 * (1 + math.cos(15 * math.pi / 16)) * (0.01 - low),
                                                    rel=1e-12)
    after = [training.lr_at(step, s) for step in range(4, 21)]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))
    assert max(training.lr_at(step, s) for step in range(30)) == pytest.approx(0.01)


def test_optimizer_decays_only_matrices_and_embeddings() -> None:
    """AdamW with two groups: weight decay on every tensor with dim >= 2 (the tied embedding once), none on
    the LayerNorm gains; every parameter in exactly one group; betas from the settings."""
    model = GPT(_cfg(n_layer=2))
    s = _settings(weight_decay=0.1, betas=(0.9, 0.95))
    opt = training.make_optimizer(model, s)
    assert isinstance(opt, torch.optim.AdamW)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    names = dict(model.named_parameters())
    want_decay = {id(p) for n, p in names.items() if n.endswith("weight") and "ln" not in n}
    want_plain = {id(p) for n, p in names.items() if "ln" in n}
    assert by_decay[0.1] == want_decay and by_decay[0.0] == want_plain and want_plain
    assert id(model.transformer.wte.weight) in by_decay[0.1]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


# ----------------------------------------------------------------------------------------------- data


def test_train_batch_is_deterministic_per_seed_and_step() -> None:
    """Same (seed, step): same batch; other step or other seed: another batch; every row is a contiguous
    window of the stream and the targets are the inputs shifted by one; a stream shorter than one window
    (block + 1 tokens) raises."""
    stream = torch.arange(500)
    x, y = training.train_batch(stream, 3, 0, 8, 16)
    x2, y2 = training.train_batch(stream, 3, 0, 8, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert not torch.equal(x, training.train_batch(stream, 4, 0, 8, 16)[0])
    assert not torch.equal(x, training.train_batch(stream, 3, 1, 8, 16)[0])
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))  # contiguous windows of arange
    assert torch.equal(y, x + 1)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert int(x.min()) >= 0 and int(y.max()) <= 499
    with pytest.raises(ValueError, match="shorter"):
        training.train_batch(torch.arange(16), 0, 0, 2, 16)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_step_batches_share_one_global_batch_over_any_process_count(world: int) -> None:
    """batch_size 3 x grad_accum 4 = 12 windows a step: the processes' shares, joined in rank order, are the rows
    one process draws (train_batch with indices step x 4 + j), in micro-batches of at most 3 rows; 3 processes take
    4 rows each, across micro-batch boundaries; another step or seed draws other rows."""
    stream, s, block = torch.arange(500) % 251, _settings(batch_size=3, grad_accum=4), 8
    one = [training.train_batch(stream, 7 * 4 + j, 5, 3, block) for j in range(4)]
    assert [(x.tolist(), y.tolist()) for x, y in training.step_batches(stream, 7, 5, s, block)] == \
        [(x.tolist(), y.tolist()) for x, y in one]
    shares = [training.step_batches(stream, 7, 5, s, block, rank, world) for rank in range(world)]
    assert all(len(x) <= 3 and sum(len(b[0]) for b in share) == 12 // world for share in shares for x, _ in share)
    joined = torch.cat([x for share in shares for x, _ in share])
    assert torch.equal(joined, torch.cat([x for x, _ in one]))
    assert torch.equal(torch.cat([y for share in shares for _, y in share]), torch.cat([y for _, y in one]))
    assert torch.equal(joined[:, 1:], torch.cat([y for share in shares for _, y in share])[:, :-1])
    assert not torch.equal(torch.cat([x for x, _ in training.step_batches(stream, 8, 5, s, block)]), joined)


def test_check_world_refuses_a_process_count_that_cannot_share_the_batch() -> None:
    """12 windows a step cannot be shared by 5 processes: the error names the counts that can; a bad rank too."""
    s = _settings(batch_size=3, grad_accum=4)
    for world in (1, 2, 3, 4, 6, 12):
        training.check_world(s, world)
    with pytest.raises(ValueError, match=r"5 processes .* divides 12: 1, 2, 3, 4, 6, 12"):
        training.check_world(s, 5)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, 2\)"):
        training.step_batches(torch.arange(100), 0, 0, s, 4, rank=2, world=2)


def test_train_batch_can_draw_every_window_including_the_last() -> None:
    """A stream of block + 1 tokens holds exactly one (input, target) window and a stream of block + 2 holds
    two (starts 0 and 1); drawing with replacement (nanoGPT's get_batch) must be able to return each of them."""
    block = 16
    x, y = training.train_batch(torch.arange(block + 1), 0, 0, 4, block)
    assert torch.equal(y[:, -1], torch.full((4,), block))  # the stream's last token is a target
    starts = {int(s) for step in range(20) for s in training.train_batch(torch.arange(block + 2), step, 0, 4,
                                                                            block)[0][:, 0]}
    assert starts == {0, 1}


def test_val_windows_are_evenly_spaced_and_disjoint() -> None:
    """n windows of block + 1 at starts i * (len // n); disjoint; the stream must hold n whole windows."""
    w = training.val_windows(torch.arange(100), 4, 9)
    assert w.shape == (4, 10) and w.dtype == torch.long
    assert w[:, 0].tolist() == [0, 25, 50, 75]
    assert torch.equal(w - w[:, :1], torch.arange(10).expand(4, 10))
    assert len(set(w.flatten().tolist())) == 40  # no token in two windows
    tight = training.val_windows(torch.arange(40), 4, 9)  # exactly four windows, tiling the stream
    assert tight.flatten().tolist() == list(range(40))
    with pytest.raises(ValueError, match="cannot hold"):
        training.val_windows(torch.arange(39), 4, 9)
    with pytest.raises(ValueError, match="cannot hold"):
        training.val_windows(torch.arange(100), 0, 9)


def test_shifted_val_windows_sit_halfway_between_and_are_disjoint() -> None:
    """shift=True: starts at i * stride + stride // 2, no token shared with the unshifted windows; the stream must
    hold twice the windows."""
    plain, shifted = training.val_windows(torch.arange(200), 4, 9), training.val_windows(torch.arange(200), 4, 9, shift=True)
    assert shifted[:, 0].tolist() == [25, 75, 125, 175]
    assert not set(plain.flatten().tolist()) & set(shifted.flatten().tolist())
    with pytest.raises(ValueError, match="as many between"):
        training.val_windows(torch.arange(60), 4, 9, shift=True)  # holds 4 windows, not 8


def test_token_stream_bytes_join_documents_with_a_blank_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """"byte" gives the UTF-8 bytes (uint8) of the documents joined by a blank line: the synthetic corpus
    against a hand encoding, and a planted two-document corpus with a non-ASCII character; an unknown
    tokenizer raises."""
    train = data.token_stream("synthetic", "train", "byte")
    assert train.dtype == torch.uint8
    want = "\n\n".join(data.corpus_texts("synthetic", "train")).encode("utf-8")
    assert bytes(train.tolist()) == want
    assert not torch.equal(train[:200], data.token_stream("synthetic", "heldout", "byte")[:200])
    monkeypatch.setattr(data, "corpus_texts", lambda corpus, split: ["Zürich", "ab"])
    assert data.token_stream("synthetic", "train", "byte").tolist() == list(b"Z\xc3\xbcrich\n\nab")
    with pytest.raises(ValueError, match="sentencepiece"):
        data.token_stream("synthetic", "train", "sentencepiece")


# ------------------------------------------------------------------------------------------- training


def test_training_learns_a_pattern_but_not_noise() -> None:
    """A 2-layer GPT at lr 1e-2 for 30 steps drives the validation loss of a repeating byte pattern far
    below its step-0 value (about ln 256); on i.i.d. uniform bytes it cannot go below ln 256. The Run's
    curve is logged every eval_interval and its window losses are the per-window mean NLL (by hand)."""
    s = _settings(steps=30, batch_size=8, lr=1e-2, warmup=3, eval_interval=10, n_val=8)
    stream = _pattern()
    val = training.val_windows(stream, 8, 16)
    model, init = training.random_init(_cfg(n_embd=32), 0)
    run = training.train("pattern", model, init, stream, val, s)
    assert [c[0] for c in run.curve] == [0, 10, 20, 30]
    assert run.curve[0][1] == pytest.approx(LN256, abs=0.1)
    assert run.val_loss < run.curve[0][1] - 3
    assert run.n_layer == 2 and run.steps == 30 and run.n_params == model.n_params() and len(run.window_losses) == 8
    with torch.no_grad():
        logp = model(val[:, :-1]).logits.log_softmax(-1)
    hand = -logp.gather(-1, val[:, 1:, None]).squeeze(-1).mean(1)
    assert run.window_losses == pytest.approx(hand.tolist(), abs=1e-5)
    assert run.val_loss == pytest.approx(float(hand.mean()), abs=1e-5)

    noise_val = training.val_windows(_noise(2000, 1), 8, 16)
    model, init = training.random_init(_cfg(n_embd=32), 0)
    control = training.train("noise", model, init, _noise(2000, 0), noise_val, s)
    assert control.val_loss > LN256 - 0.1


def test_training_is_cached_by_content(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call with a fresh model and the same key returns the stored run without drawing a batch;
    changing the seed changes the key, and that call does train (the spy sees it)."""
    s = _settings()
    stream, val = _pattern(), training.val_windows(_pattern(), 4, 16)
    model, init = training.random_init(_cfg(), 0)
    first = training.train("a", model, init, stream, val, s)

    def no_training(*_a, **_k):
        raise RuntimeError("trained")

    monkeypatch.setattr(training, "train_batch", no_training)
    fresh, init = training.random_init(_cfg(), 0)
    second = training.train("a", fresh, init, stream, val, s)
    assert second.window_losses == first.window_losses and second.seconds == first.seconds
    assert second.tokens_per_s == first.tokens_per_s and second.path == first.path
    assert [list(c) for c in second.curve] == [list(c) for c in first.curve]
    assert os.path.exists(os.path.join(second.path, "model.safetensors"))
    loaded = second.load()
    assert training.window_losses(loaded, val).tolist() == first.window_losses
    with pytest.raises(RuntimeError, match="trained"):
        training.train("a", training.random_init(_cfg(), 0)[0], {"kind": "random", "seed": 0}, stream, val, s,
                         seed=1)


def test_cached_run_equals_the_run_that_produced_it() -> None:
    """The Run read back from the cache is the Run ``train`` returned when it trained (same fields, the
    curve as the annotated list of (step, loss) tuples), so callers can compare runs regardless of
    whether they came from the cache."""
    s = _settings()
    stream, val = _pattern(), training.val_windows(_pattern(), 4, 16)
    model, init = training.random_init(_cfg(), 0)
    first = training.train("a", model, init, stream, val, s)
    second = training.train("a", training.random_init(_cfg(), 0)[0], init, stream, val, s)
    assert all(isinstance(c, tuple) for c in first.curve)
    assert second == first


def test_a_run_records_its_median_step_and_mfu_against_the_peak(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a known peak (CPU) a run's MFU is None; with REPRO_PEAK_TFLOPS the MFU is one step's model FLOPs (3
    forward passes of batch x block tokens, timeplan's count) over the median step time (the first, compilation,
    left out) times the peak; both are in the cached run."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    stream, cfg, s = _pattern(), _cfg(), _settings(steps=5)
    val = training.val_windows(stream, 4, cfg.block_size)
    model, init = training.random_init(cfg, 0)
    assert training.train("cpu", model, init, stream, val, s).mfu is None
    monkeypatch.setenv("REPRO_PEAK_TFLOPS", "0.001")
    model, init = training.random_init(cfg, 1)
    run = training.train("peak", model, init, stream, val, s, seed=1)
    flops = 3 * timeplan.forward_flops(Shape.from_config(cfg), cfg.block_size) * s.batch_size * cfg.block_size
    assert 0 < run.step_s < run.seconds and run.mfu == pytest.approx(flops / (run.step_s * 1e9), rel=1e-12)
    cached = training.train("peak", *training.random_init(cfg, 1), stream, val, s, seed=1)
    assert (cached.step_s, cached.mfu) == (run.step_s, run.mfu)


def test_compiled_only_on_a_gpu_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the module is returned as is; on a GPU device it goes through torch.compile, unless REPRO_COMPILE=0."""
    net = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))
    assert training.compiled(net, torch.device("cpu")) is net
    assert training.compiled(net, torch.device("cuda")) == ("compiled", net)
    monkeypatch.setenv("REPRO_COMPILE", "0")
    assert training.compiled(net, torch.device("cuda")) is net


def test_cache_only_returns_cached_runs_and_refuses_to_train(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``cache_only`` a run not in the cache raises NotCached (naming it) and leaves nothing behind; the
    same run trained outside the context is then returned from inside it; the context ends with its block."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    stream = _pattern()
    val = training.val_windows(stream, 4, 16)

    def run():
        model, init = training.random_init(_cfg(), 0)
        return training.train("probe", model, init, stream, val, _settings())

    with pytest.raises(training.NotCached, match=r"run 'probe' \(2 layers, 6 steps, seed 0\) is not in the cache"):
        with training.cache_only():
            run()
    assert not (tmp_path / "inheritune").exists() or not any((tmp_path / "inheritune").iterdir())
    trained = run()
    with training.cache_only():
        assert run().window_losses == trained.window_losses
    assert run().path == trained.path


def test_interrupted_training_resumes_bit_identically(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Interrupt a run (raise from ``progress.report`` at step 6, after the step-4 checkpoint), call ``train`` again:
    it loads the checkpoint with ``weights_only=True``, draws only steps 4-7, and ends with the same curve and
    per-window losses as an uninterrupted run in another cache directory."""
    s = _settings(steps=8, eval_interval=2, ckpt_interval=2)
    stream, val = _pattern(), training.val_windows(_pattern(), 4, 16)

    def interrupt(task: str, done: int, total: int | None = None, note: str = "") -> None:
        if done == 6:
            raise KeyboardInterrupt

    model, init = training.random_init(_cfg(), 0)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(progress, "report", interrupt)
        training.train("r", model, init, stream, val, s)
    ckpts = list((tmp_path / "cache" / "inheritune").glob("*.work/ckpt.pt"))
    assert len(ckpts) == 1
    assert torch.load(ckpts[0], weights_only=True)["step"] == 4

    loads: list = []
    real_load = torch.load

    def spy_load(*args, **kw):
        loads.append(kw.get("weights_only"))
        return real_load(*args, **kw)

    monkeypatch.setattr(torch, "load", spy_load)
    calls = _count_batches(monkeypatch)
    model, init = training.random_init(_cfg(), 0)
    resumed = training.train("r", model, init, stream, val, s)
    assert loads == [True]
    assert calls == [4, 5, 6, 7]
    assert not ckpts[0].parent.exists()  # the work dir is cleaned up

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "other"))
    calls.clear()
    model, init = training.random_init(_cfg(), 0)
    straight = training.train("r", model, init, stream, val, s)
    assert calls == list(range(8)) and loads == [True]  # trained from scratch, no checkpoint to load
    assert [c[0] for c in straight.curve] == [0, 2, 4, 6, 8]
    assert resumed.window_losses == straight.window_losses
    assert [tuple(c) for c in resumed.curve] == [tuple(c) for c in straight.curve]


def _record_lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Spy on the optimizers ``train`` makes: the learning rate each optimizer step actually used."""
    seen: list[float] = []
    real = training.make_optimizer

    def spy(model, settings):
        opt = real(model, settings)
        step = opt.step
        opt.step = lambda *a, **k: (seen.append(opt.param_groups[0]["lr"]), step(*a, **k))[1]
        return opt

    monkeypatch.setattr(training, "make_optimizer", spy)
    return seen


def _warmup1_cosine(total: int, lr: float = 0.01, low: float = 0.001) -> list[float]:
    """One warmup step at the peak, then the cosine from lr to low over steps 1 .. total (by hand)."""
    return [lr] + [low + 0.5 * (1 + math.cos(math.pi * (i - 1) / (total - 1))) * (lr - low) for i in range(1, total)]


def test_training_applies_the_schedule_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each optimizer step of a default-length run uses warmup then the cosine (by hand), not the constant peak."""
    seen = _record_lrs(monkeypatch)
    s = _settings(steps=4, warmup=1, lr=0.01, min_lr_ratio=0.1)
    stream, val = _pattern(), training.val_windows(_pattern(), 4, 16)
    training.train("S", *training.random_init(_cfg(), 0), stream, val, s)
    assert seen == pytest.approx(_warmup1_cosine(4), rel=1e-12)


def test_a_longer_run_stretches_the_cosine_over_its_own_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train(steps=...)`` (random_2x trains 2S) uses warmup then the cosine over *its* step count, as the
    default run does over s.steps (research D10: full cosine over the run; the paper's 200K-step baseline has its
    own schedule), instead of sitting at the floor for its second half."""
    seen = _record_lrs(monkeypatch)
    s = _settings(steps=4, warmup=1, lr=0.01, min_lr_ratio=0.1)
    stream, val = _pattern(), training.val_windows(_pattern(), 4, 16)
    training.train("2S", *training.random_init(_cfg(), 0), stream, val, s, steps=8)
    assert len(seen) == 8
    assert seen == pytest.approx(_warmup1_cosine(8), rel=1e-12)


# ----------------------------------------------------------------------------------------- inheritance


@pytest.fixture
def reference() -> GPT:
    """A 4-layer GPT with every parameter (LayerNorm gains too) moved off its init, as training would."""
    ref, _ = training.random_init(_cfg(n_layer=4), 1)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize(("which", "idx"), [("first", [0, 1]), ("last", [2, 3]), ("middle", [1, 2]),
                                            ([3, 0], [3, 0])])
def test_inherit_copies_chosen_blocks_and_token_embedding_only(reference: GPT, which, idx: list[int]) -> None:
    """The target's block j is the reference's block idx[j] (and no other); wte is copied and so is the tied
    lm_head; wpe and ln_f are those of a fresh random_init of the target with the same seed, not the
    reference's; the reference is untouched; the init record names the layers."""
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    target, how = training.inherit(reference, 2, which, seed=7, reference_id="ref123")
    fresh, _ = training.random_init(_cfg(n_layer=2), 7)
    assert target.config.n_layer == 2 and target.config.shape() == {**reference.config.shape(), "n_layer": 2}
    for j, old in enumerate(idx):
        for k in range(4):
            assert _same_state(target.transformer.h[j], reference.transformer.h[k]) == (k == old)
    t, r, f = target.transformer, reference.transformer, fresh.transformer
    assert torch.equal(t.wte.weight, r.wte.weight) and target.lm_head.weight is t.wte.weight
    assert torch.equal(t.wpe.weight, f.wpe.weight) and not torch.equal(t.wpe.weight, r.wpe.weight)
    assert _same_state(t.ln_f, f.ln_f) and not _same_state(t.ln_f, r.ln_f)
    assert how == {"kind": "inherit", "reference": "ref123", "layers": idx, "copy_pos_and_final_ln": False,
                   "seed": 7}
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


def test_inherit_can_copy_positions_and_final_norm(reference: GPT) -> None:
    """copy_pos_and_final_ln=True also copies wpe and ln_f (the D7 ablation); the blocks are as before."""
    target, how = training.inherit(reference, 3, "first", copy_pos_and_final_ln=True)
    t, r = target.transformer, reference.transformer
    assert torch.equal(t.wpe.weight, r.wpe.weight) and _same_state(t.ln_f, r.ln_f)
    assert all(_same_state(t.h[j], r.h[j]) for j in range(3))
    assert how["copy_pos_and_final_ln"] is True and how["layers"] == [0, 1, 2]


@pytest.mark.parametrize(("n_layers", "which"), [(0, "first"), (4, "first"), (5, "last"), (2, "bogus"),
                                                 (2, [0]), (2, [0, 4]), (2, [-1, 0])])
def test_inherit_refuses_bad_depths_and_choices(reference: GPT, n_layers: int, which) -> None:
    """Depth 0 or >= the reference's depth, an unknown choice, and explicit lists of the wrong length or
    with out-of-range indices raise ValueError."""
    with pytest.raises(ValueError):
        training.inherit(reference, n_layers, which)


def test_choose_layers_middle_rounds_down() -> None:
    """The middle n of N start at (N - n) // 2: 3 of 5 -> 1..3, 2 of 6 -> 2..3, 2 of 5 -> 1..2."""
    assert training.choose_layers(5, 3, "middle") == [1, 2, 3]
    assert training.choose_layers(6, 2, "middle") == [2, 3]
    assert training.choose_layers(5, 2, "middle") == [1, 2]
    assert training.choose_layers(6, 2, "last") == [4, 5]


# ----------------------------------------------------------------------------------------------- growth


def _fake_target(losses: dict[int, float], asked: list[int]):
    def train_target(n: int) -> Run:
        asked.append(n)
        return _run(f"t{n}", n, [losses[n]] * 3)
    return train_target


def test_grow_stops_at_the_first_round_within_tolerance() -> None:
    """Rounds l, l + step, ...; the first whose loss is <= reference + tolerance ends growth, matched
    (the boundary counts)."""
    ref = _run("ref", 8, [2.0, 2.0])
    asked: list[int] = []
    g = training.grow(_fake_target({2: 2.75, 4: 2.5, 6: 1.0}, asked), ref, 2, step=2, tolerance=0.5, max_rounds=3)
    assert asked == [2, 4] and [r.n_layer for r in g.rounds] == [2, 4]
    assert g.matched and g.final.n_layer == 4 and g.tolerance == 0.5
    asked.clear()
    g = training.grow(_fake_target({2: 1.5}, asked), ref, 2, tolerance=0.01)
    assert asked == [2] and g.matched


def test_grow_respects_max_rounds_and_the_reference_depth() -> None:
    """Without a match growth stops after max_rounds, or before reaching the reference's depth, unmatched;
    step sets the increment; step or max_rounds below 1 raise."""
    ref = _run("ref", 8, [2.0])
    far = {n: 3.0 for n in range(1, 9)}
    asked: list[int] = []
    g = training.grow(_fake_target(far, asked), ref, 2, step=2, tolerance=0.01, max_rounds=2)
    assert asked == [2, 4] and not g.matched
    asked.clear()
    g = training.grow(_fake_target(far, asked), ref, 2, step=2, tolerance=0.01, max_rounds=10)
    assert asked == [2, 4, 6] and not g.matched
    asked.clear()
    g = training.grow(_fake_target(far, asked), ref, 2, step=3, tolerance=0.01, max_rounds=10)
    assert asked == [2, 5] and len(g.rounds) == 2
    for bad in ({"step": 0}, {"max_rounds": 0}):
        with pytest.raises(ValueError):
            training.grow(_fake_target(far, []), ref, 2, **bad)


def test_paired_difference_by_hand() -> None:
    """d = a - b = [1, 0.5, 2, -1]: mean 0.625, sample std 1.25 (sum of squared deviations 4.6875 / 3), so
    standard error 1.25 / sqrt(4) = 0.625; swapping a and b flips the mean, keeps the error."""
    a, b = _run("a", 2, [3.0, 2.5, 4.0, 1.0]), _run("b", 2, [2.0, 2.0, 2.0, 2.0])
    assert training.paired_difference(a, b) == pytest.approx((0.625, 0.625), rel=1e-12)
    assert training.paired_difference(b, a) == pytest.approx((-0.625, 0.625), rel=1e-12)
    assert training.paired_difference(a, a) == (0.0, 0.0)
    assert a.val_loss == 2.625
    # val_se: deviations 0.375, -0.125, 1.375, -1.625 of a itself -> same std 1.25, se 0.625
    assert a.val_se == pytest.approx(0.625, rel=1e-6)


def test_paired_difference_keeps_float64_precision() -> None:
    """Window losses are float64 (``window_losses``); their paired difference must not be rounded through
    float32. Losses near 5.43 that differ by 1e-4..4e-4: exact mean 2.5e-4, se sqrt(1/6)*1e-4/2 (the
    differences' sample std is that of 1, 2, 3, 4 times 1e-4)."""
    base = [5.432109876, 5.432113579, 5.431987654, 5.432001234]
    diffs = [1e-4, 2e-4, 3e-4, 4e-4]
    a, b = _run("a", 2, [x + d for x, d in zip(base, diffs, strict=True)]), _run("b", 2, base)
    mean, se = training.paired_difference(a, b)
    assert mean == pytest.approx(2.5e-4, rel=1e-9)
    assert se == pytest.approx(math.sqrt(5 / 3) * 1e-4 / 2, rel=1e-9)


# ------------------------------------------------------------------------------------------- acceptance


# ------------------------------------------------------------------------------------------ end to end


def test_experiment_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The tiny smoke experiment: a 4-layer reference, every variant at 2 layers (random_2x at twice the
    steps), growth round 1 is inherit_first read from the cache (no extra batches drawn), the manifest gets
    ``gpt-byte/inheritune/<variant>/val_loss`` beside the paper's numbers, and acceptance runs on attention
    captured from the reloaded models. An unknown variant raises before anything trains."""
    ref_cfg = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16)
    s = PretrainSettings(steps=6, batch_size=4, lr=3e-3, warmup=2, eval_interval=3, n_val=4)
    stream = data.token_stream("synthetic", "train", "byte")
    val = training.val_windows(data.token_stream("synthetic", "heldout", "byte"), s.n_val, 16)
    calls = _count_batches(monkeypatch)
    with pytest.raises(ValueError, match="bogus"):
        training.run_experiment(ref_cfg, s, stream, val, variants=("random", "bogus"))
    assert calls == []

    exp = training.run_experiment(ref_cfg, s, stream, val)
    assert len(calls) == 6 + 4 * 6 + 12  # reference, four variants at S, random_2x at 2S; growth: cached
    ref = exp.reference
    assert ref.n_layer == 4 and ref.steps == 6 and [c[0] for c in ref.curve] == [0, 3, 6]
    assert set(exp.variants) == set(training.VARIANTS)
    assert all(r.n_layer == 2 for r in exp.variants.values())
    assert exp.variants["random_2x"].steps == 12 and exp.variants["random"].steps == 6
    assert [c[0] for c in exp.variants["random_2x"].curve] == [0, 3, 6, 9, 12]
    ref_id = os.path.basename(ref.path)
    for which, idx in (("first", [0, 1]), ("last", [2, 3]), ("middle", [1, 2])):
        assert exp.variants[f"inherit_{which}"].init == {"kind": "inherit", "reference": ref_id, "layers": idx,
                                                         "copy_pos_and_final_ln": False, "seed": 0}
    assert exp.variants["random"].init == {"kind": "random", "seed": 0}
    g = exp.growth
    assert [r.n_layer for r in g.rounds] == [2]  # the next round (4 layers) would be the reference itself
    assert g.rounds[0].name == "inherit_first"  # the cached run, not a fresh "inheritune_2L"
    assert g.rounds[0].val_loss == exp.variants["inherit_first"].val_loss
    assert g.rounds[0].path == exp.variants["inherit_first"].path
    assert g.tolerance == max(0.01, 2 * ref.val_se)
    assert g.matched == (g.rounds[0].val_loss <= ref.val_loss + g.tolerance)

    monkeypatch.setattr(profiles, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(session, "REPO_ROOT", tmp_path)
    with matplotlib.rc_context():
        session.setup("04_attention_degeneration_inheritune", "smoke", 0)
    results.record_experiment("gpt-byte", exp)
    records = {r["key"]: r for r in manifest.current().records}
    paper = {"reference": 2.81, "inherit_first": 2.87, "inherit_last": None, "random": None, "random_2x": None}
    for name, value in paper.items():
        rec = records[f"gpt-byte/inheritune/{name}/val_loss"]
        assert rec["value"] == pytest.approx(exp.runs[name].val_loss, rel=1e-12)
        assert rec["paper_value"] == value
    first, rnd = exp.variants["inherit_first"].window_losses, exp.variants["random"].window_losses
    want = sum(a - b for a, b in zip(first, rnd, strict=True)) / len(first)
    assert records["gpt-byte/inheritune/diff/inherit_first-random"]["value"] == pytest.approx(want, abs=1e-6)
    assert records["gpt-byte/inheritune/growth/layers"]["value"] == [2]
    assert records["gpt-byte/inheritune/growth/matched"]["value"] == g.matched

    reference = ref.load()
    target = g.final.load()
    assert training.window_losses(reference, val).tolist() == ref.window_losses
    ids = val[:2, :-1]
    ref_stats, tgt_stats = capture_attention(reference, [ids]), capture_attention(target, [ids])
    assert ref_stats.max_rank().shape == (4,) and tgt_stats.max_rank().shape == (2,)
    out = results.acceptance(exp, ref_stats, tgt_stats)
    rank = ref_stats.max_rank()
    assert out["s1_maxrank_last_third_over_first_half"] == pytest.approx(float(rank[3] / rank[:2].mean()))
    assert out["s3_lazy_layers"] == len(ref_stats.lazy_layers())
    assert out["s4a_first_minus_random"] == pytest.approx(want, abs=1e-6)
    assert out["s4b_first_within_tol_of_reference"] == (exp.variants["inherit_first"].val_loss
                                                       <= ref.val_loss + g.tolerance)
    assert out["s6_lazy_share_inheritune"] == len(tgt_stats.lazy_layers()) / 2


def test_write_token_file_streams_uint16_and_is_atomic(tmp_path) -> None:
    """The BPE stream writer: every document followed by a blank line, encoded in batches, ids stored as raw
    uint16 in order (read back by memmap as token_stream does); an id beyond uint16 raises and leaves no file."""
    import numpy as np

    docs = ["ab", "c", "de"]
    encode = lambda batch: [[ord(ch) for ch in d] for d in batch]  # noqa: E731
    path = tmp_path / "tokens" / "x.bin"
    assert data.write_token_file(docs, encode, path, batch=2) == 2 + 2 + 1 + 2 + 2 + 2
    ids = np.memmap(path, dtype=np.uint16, mode="r").tolist()
    assert ids == [ord(ch) for ch in "ab\n\nc\n\nde\n\n"]
    with pytest.raises(ValueError, match="uint16"):
        data.write_token_file(docs, lambda batch: [[70_000] for _ in batch], tmp_path / "big.bin")
    assert not (tmp_path / "big.bin").exists() and not (tmp_path / "big.bin.tmp").exists()


def test_data_digest_follows_every_token() -> None:
    """Equal streams share a digest; changing one token or the length changes it (cache keys follow the data)."""
    a = torch.arange(100, dtype=torch.uint8)
    b = a.clone()
    b[57] += 1
    assert training.data_digest(a) == training.data_digest(a.clone())
    assert training.data_digest(a) != training.data_digest(b) != training.data_digest(a[:99])


def test_val_curves_figure_has_every_run_and_round() -> None:
    """One line per run in both panels plus one per extra growth round; the zoom starts at 40% of S."""
    from common.inheritune import figures

    ref = _run("reference", 4, [2.0], steps=10, curve=[(0, 5.0), (5, 3.0), (10, 2.0)])
    runs = {"reference": ref, "random": _run("random", 2, [2.5], steps=10, curve=[(0, 5.0), (10, 2.5)])}
    fig = figures.plot_val_curves(runs, [_run("inheritune_3L", 3, [2.1], steps=10)])
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]
    assert fig.axes[1].get_xlim()[0] == pytest.approx(4.0)

