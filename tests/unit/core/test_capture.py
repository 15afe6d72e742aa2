"""``common.core.capture``: hook statistics equal a brute-force computation from full tensors; hooks never leak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.core import arch, capture
from common.core.models import PLANT

T, B, K = 16, 2, 3
POINTS4 = ("hidden", "inter", "attn_out", "mlp_out")


def _batch(seed: int, b: int = B, t: int = T) -> torch.Tensor:
    """Random byte-token ids starting with BOS (id 1), like every tiny-llama sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (b, t), generator=g)
    ids[:, 0] = 1
    return ids


def _full_tensors(model: nn.Module, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per point and layer the complete [B, T, D] tensor, from hooks written here (not common.core.capture)."""
    n = len(arch.layers(model))
    full: dict[str, list] = {p: [None] * n for p in POINTS4}
    handles = []

    def keep(point, i):
        def hook(_m, _args, out):
            full[point][i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    for i in range(n):
        handles.append(arch.layers(model)[i].register_forward_hook(keep("hidden", i)))
        handles.append(arch.attention(model, i).register_forward_hook(keep("attn_out", i)))
        handles.append(arch.mlp(model, i).register_forward_hook(keep("mlp_out", i)))
        handles.append(arch.down_proj(model, i).register_forward_pre_hook(
            lambda _m, args, i=i: full["inter"].__setitem__(i, args[0].detach().clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    full["hf_hidden"] = list(out.hidden_states)
    return full


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hidden_point_is_layer_output(tiny_llama) -> None:
    """Sanity of the reference: the layer-output hook agrees with HF's ``hidden_states`` (whose last entry
    is the final-normed state, so the last layer is compared through the final norm)."""
    model, _ = tiny_llama
    full = _full_tensors(model, _batch(0))
    n = len(arch.layers(model))
    for i in range(n - 1):
        torch.testing.assert_close(full["hidden"][i], full["hf_hidden"][i + 1], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(full["hidden"][n - 1]), full["hf_hidden"][n])


def test_capture_matches_brute_force(tiny_llama) -> None:
    """pos0 vectors, per-sequence top-k |x| with flat index t*D+d, and per-sequence median |x| (the lower
    middle value of the sorted T*D entries, torch's convention) equal the values from full tensors."""
    model, _ = tiny_llama
    ids = _batch(1)
    stats = capture.capture(model, [ids], points=capture.POINTS, whole=True, k=K)
    full = _full_tensors(model, ids)
    n_layers = len(arch.layers(model))
    assert stats.seq_len == T
    for point in POINTS4:
        width = full[point][0].shape[-1]
        assert stats.pos0[point].shape == (B, n_layers, width)
        assert stats.top[point].shape == (B, n_layers, K)
        assert stats.top_index[point].shape == (B, n_layers, K)
        assert stats.median[point].shape == (B, n_layers)
        for i in range(n_layers):
            x = full[point][i]
            torch.testing.assert_close(stats.pos0[point][:, i], x[:, 0], rtol=0, atol=0)
            for s in range(B):
                flat = x[s].abs().flatten()
                order = sorted(range(flat.numel()), key=lambda j: -float(flat[j]))
                assert stats.top_index[point][s, i].tolist() == order[:K], (point, i, s)
                assert stats.top[point][s, i].tolist() == [float(flat[j]) for j in order[:K]]
                for v, j in zip(stats.top[point][s, i].tolist(), stats.top_index[point][s, i].tolist(), strict=True):
                    t, d = divmod(j, width)
                    assert v == abs(float(x[s, t, d]))
                ascending = sorted(flat.tolist())
                assert float(stats.median[point][s, i]) == ascending[(len(ascending) - 1) // 2]


def test_planted_channel_is_top1_at_bos(tiny_llama) -> None:
    """The planted intermediate channel at the planted layer is each sequence's top-1 |x|, at token 0 —
    and it is not the top-1 of the layer before (where nothing is planted)."""
    model, _ = tiny_llama
    stats = capture.capture(model, [_batch(2)], points=("inter",), whole=True, k=K)
    width = stats.pos0["inter"].shape[-1]
    top1 = stats.top_index["inter"][:, PLANT["layer"], 0]
    assert top1.tolist() == [0 * width + PLANT["channel"]] * B
    assert stats.top["inter"][:, PLANT["layer"], 0].min() > 100
    assert stats.top["inter"][:, PLANT["layer"] - 1, 0].max() < 1


def test_stats_accumulate_over_batches(tiny_llama) -> None:
    """Several batches stack along N, in order, and each block equals a capture of that batch alone."""
    model, _ = tiny_llama
    b1, b2 = _batch(3), _batch(4, b=3, t=T)
    both = capture.capture(model, [b1, b2], points=POINTS4, whole=True, k=K)
    one = capture.capture(model, [b1], points=POINTS4, whole=True, k=K)
    two = capture.capture(model, [b2], points=POINTS4, whole=True, k=K)
    for point in POINTS4:
        for kind in ("pos0", "top", "top_index", "median"):
            got = getattr(both, kind)[point]
            assert got.shape[0] == 5
            torch.testing.assert_close(got, torch.cat([getattr(one, kind)[point], getattr(two, kind)[point]]))


def test_variable_length_prompts_one_by_one(tiny_llama) -> None:
    """Prompts of different lengths fed one by one give one pos0 row each; seq_len is the last length."""
    model, _ = tiny_llama
    batches = [_batch(5, b=1, t=t) for t in (4, 9, 6)]
    stats = capture.capture(model, batches, points=("hidden",))
    assert stats.pos0["hidden"].shape[0] == 3
    assert stats.seq_len == 6


def test_whole_false_keeps_only_pos0(tiny_llama) -> None:
    """Without ``whole`` only position-0 vectors are kept (no top-k, no medians)."""
    model, _ = tiny_llama
    stats = capture.capture(model, [_batch(6)], points=("hidden", "inter"))
    assert set(stats.pos0) == {"hidden", "inter"}
    assert stats.top == {} and stats.top_index == {} and stats.median == {}


def test_k_sets_topk_width(tiny_llama) -> None:
    """``k`` is the number of kept top values, sorted descending."""
    model, _ = tiny_llama
    stats = capture.capture(model, [_batch(7)], points=("hidden",), whole=True, k=5)
    top = stats.top["hidden"]
    assert top.shape[-1] == 5
    assert (top[..., :-1] >= top[..., 1:]).all()


def test_capture_skips_lm_head_and_keeps_no_graph(tiny_llama) -> None:
    """``capture`` runs the backbone only (the LM head never runs) and returns CPU tensors without grad."""
    model, _ = tiny_llama
    calls = []
    h = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        stats = capture.capture(model, [_batch(8)], points=("hidden",), whole=True)
    finally:
        h.remove()
    assert calls == []
    assert not stats.pos0["hidden"].requires_grad and stats.pos0["hidden"].device.type == "cpu"


def test_post_ffn_absent_for_llama(tiny_llama) -> None:
    """Llama has no post-FFN norm: asking for every point simply yields no ``post_ffn`` entry."""
    model, _ = tiny_llama
    stats = capture.capture(model, [_batch(9)], points=capture.POINTS, whole=True)
    assert "post_ffn" not in stats.pos0 and "post_ffn" not in stats.median
    assert set(stats.pos0) == set(POINTS4)


def test_post_ffn_present_for_gemma3(make_tiny) -> None:
    """On Gemma-3 the ``post_ffn`` point is the output of the post-feedforward norm."""
    model = make_tiny("gemma3_text")
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = {}
    norm = arch.post_ffn_norm(model, 1)
    h = norm.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out.detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    stats = capture.capture(model, [ids], points=capture.POINTS)
    assert stats.pos0["post_ffn"].shape == (2, 2, model.config.hidden_size)
    torch.testing.assert_close(stats.pos0["post_ffn"][:, 1], seen["out"][:, 0])


def test_hooks_removed_after_context(tiny_llama) -> None:
    """``recording`` adds hooks while open and removes all of them on exit (capture too)."""
    model, _ = tiny_llama
    before = _n_hooks(model)
    with capture.recording(model, points=capture.POINTS, whole=True) as rec:
        assert _n_hooks(model) == before + 4 * len(arch.layers(model))  # no post_ffn hooks on Llama
        with torch.no_grad():
            arch.backbone(model)(input_ids=_batch(10))
    assert _n_hooks(model) == before
    assert rec.result().pos0["hidden"].shape[0] == B
    capture.capture(model, [_batch(11)], points=capture.POINTS)
    assert _n_hooks(model) == before


def test_hooks_removed_on_exception(tiny_llama) -> None:
    """An exception inside ``recording`` propagates and leaves no hook behind."""
    model, _ = tiny_llama
    before = _n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture.recording(model, points=capture.POINTS):
            assert _n_hooks(model) > before
            raise RuntimeError("boom")
    assert _n_hooks(model) == before


def test_unknown_point_raises_and_cleans_up(tiny_llama) -> None:
    """An unknown point name raises ValueError listing the known points; hooks already added are removed."""
    model, _ = tiny_llama
    before = _n_hooks(model)
    with pytest.raises(ValueError, match="known: hidden, inter") as err:
        with capture.recording(model, points=("hidden", "residual")):
            pass
    assert "'residual'" in str(err.value)
    assert _n_hooks(model) == before
    with pytest.raises(ValueError):
        capture.capture(model, [_batch(12)], points=("nope",))
    assert _n_hooks(model) == before
