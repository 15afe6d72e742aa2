"""What notebook 04 reads off Inheritune's runs (arXiv 2404.08634 v4 §4, Tables 4-5, Fig. 3): the manifest records
of an experiment (seed-averaged losses, paired differences with their intervals, growth rounds), research
inheritune.md §5.2's acceptance readings, and the table of runs."""

from __future__ import annotations

import os

import numpy as np

from common.core import intervals
from common.core.manifest import current, record
from common.inheritune import paper
from common.inheritune.training import Experiment, Run, paired_difference


def _seed_mean(exps: list[Experiment], name: str) -> np.ndarray:
    """The per-window validation losses of run ``name``, averaged over the experiments' training seeds."""
    return np.mean([e.runs[name].window_losses for e in exps], axis=0)


def record_experiment(key: str, exps: Experiment | list[Experiment]) -> None:
    """Record ``<key>/inheritune/<variant>/val_loss`` (DESIGN §9) with the paper's values beside them, the
    evaluation noise, the paired differences the claims and acceptance checks read (S4, S5), and the growth rounds.
    With several experiments (one per training seed, same validation windows) every loss and difference is the
    mean over seeds, its interval the paired bootstrap over windows of the seed-averaged per-window losses, and the
    per-seed values are recorded beside it; curves and growth rounds are the first seed's."""
    exps = [exps] if isinstance(exps, Experiment) else list(exps)
    exp = exps[0]
    current().run["models"][key] = f"self-trained:inheritune/{os.path.basename(exp.reference.path)}"
    current().run.setdefault("dtypes", {})[key] = "float32"  # fp32 weights evaluated without autocast (window_losses)
    current().save()
    seeds = f"; mean over {len(exps)} training seeds" if len(exps) > 1 else ""
    window_note = f"{len(exp.reference.window_losses)} fixed validation windows; nats per token{seeds}"
    for name, run in exp.runs.items():
        value, ref = paper.VAL_LOSS.get(name, (None, None))
        losses = _seed_mean(exps, name)
        record(f"{key}/inheritune/{name}/val_loss", float(losses.mean()), paper=value,
               paper_ref=ref and f"Inheritune {ref}", ci95=intervals.mean(losses)["ci95"],
               note=f"{run.n_layer} layers, {run.steps} steps, {run.n_params:,} parameters; {window_note}; 95% "
                    "bootstrap over the windows")
        if len(exps) > 1:
            record(f"{key}/inheritune/{name}/val_loss_seeds", [e.runs[name].val_loss for e in exps],
                   note="one value per training seed")
        record(f"{key}/inheritune/{name}/curve", [list(c) for c in run.curve], note="[step, validation loss]")
        record(f"{key}/inheritune/{name}/tokens_per_s", run.tokens_per_s, note="training throughput, no evaluation",
               volatile=True)
        record(f"{key}/inheritune/{name}/mfu", run.mfu, volatile=True,
               note="model FLOPs utilisation of a training step (PaLM's count over the GPUs' dense bf16 peak; "
                    "median step, the first left out); null on CPU or a GPU of unknown peak")
    record(f"{key}/inheritune/eval_se", exp.reference.val_se, note="standard error of the reference's validation loss")
    for a, b in (("inherit_first", "random"), ("inherit_first", "reference"), ("inherit_first", "random_2x"),
                 ("inherit_last", "random"), ("inherit_last", "inherit_first"), ("inherit_middle", "inherit_first"),
                 ("random", "reference")):
        if a in exp.runs and b in exp.runs:
            diff = intervals.paired_difference(_seed_mean(exps, a), _seed_mean(exps, b))
            record(f"{key}/inheritune/diff/{a}-{b}", diff["value"], ci95=diff["ci95"],
                   note=f"validation loss {a} - {b}, nats per token{seeds}; 95% paired bootstrap over {diff['n']} "
                        "windows" + (" (the seeds' own spread is not in it: see /seeds)" if seeds else ""))
            if len(exps) > 1:
                record(f"{key}/inheritune/diff/{a}-{b}/seeds", [e.runs[a].val_loss - e.runs[b].val_loss for e in exps],
                       note="one difference per training seed")
    g = exp.growth
    record(f"{key}/inheritune/growth/layers", [r.n_layer for r in g.rounds], note="target depth of each round")
    record(f"{key}/inheritune/growth/val_loss", [r.val_loss for r in g.rounds],
           paper=paper.GROWTH_VAL_LOSS, paper_ref=paper.GROWTH_VAL_LOSS_REF)
    record(f"{key}/inheritune/growth/matched", g.matched,
           note=f"last round within tolerance {g.tolerance:.4f} = max(0.01, 2 x eval se) of the reference (D9)")


def _over(d: float, se: float) -> float | None:
    """``d`` in units of its standard error (None when the error is 0: identical windows)."""
    return d / se if se > 0 else None


def _curve_at(run: Run, step: int) -> float:
    """The validation loss logged closest to ``step``."""
    return min(run.curve, key=lambda c: abs(c[0] - step))[1]


def acceptance(exp: Experiment, ref_stats, target_stats) -> dict[str, float | bool | None]:
    """Research inheritune.md §5.2 on one experiment: S1-S3 on the reference's attention (``ref_stats``), S4
    and S5 on the validation losses (paired over the fixed windows; "noise" = the paired s.e.), S6 on the
    Inheritune model's attention (``target_stats``). Values are reported; only S4a is a pass criterion on CPU."""
    rank, mass = ref_stats.max_rank(), ref_stats.avg_mass()
    n = len(rank)
    last_third, first_half = slice(n - max(1, n // 3), None), slice(0, max(1, n // 2))
    out: dict[str, float | bool | None] = {
        "s1_maxrank_last_third_over_first_half": float(rank[last_third].mean() / rank[first_half].mean()),
        "s2_avgmass_last_third": float(mass[last_third].mean()),
        "s2_avgmass_first3_over_last_third": float(mass[:3].mean() / mass[last_third].mean()),
        "s3_lazy_layers": len(ref_stats.lazy_layers())}
    v, tol = exp.runs, exp.growth.tolerance
    first, rnd = v.get("inherit_first"), v.get("random")
    if first and rnd:
        d, se = paired_difference(first, rnd)
        out.update({"s4a_first_minus_random": d, "s4a_noise_se": se, "s4a_over_se": _over(d, se),
                    "s4a_first_beats_random": d < -3 * se})
    if first:
        out["s4b_first_within_tol_of_reference"] = first.val_loss <= exp.reference.val_loss + tol
        out["s4b_after_growth"] = exp.growth.matched
    if first and "random_2x" in v:
        out["s4c_first_within_tol_of_random_2x"] = first.val_loss <= v["random_2x"].val_loss + tol
    if first and rnd and "inherit_last" in v:
        last_run = v["inherit_last"]
        d, se = paired_difference(last_run, rnd)
        early = max(1, exp.reference.steps // 10)
        out.update({"s5_last_minus_random": d, "s5_over_se": _over(d, se), "s5_last_within_noise_of_random": abs(d) <= 3 * se,
                    "s5_last_minus_first": paired_difference(last_run, first)[0],
                    "s5_early_last_minus_random": _curve_at(last_run, early) - _curve_at(rnd, early),
                    "s5_early_first_minus_random": _curve_at(first, early) - _curve_at(rnd, early)})
    out["s6_lazy_share_reference"] = len(ref_stats.lazy_layers()) / n
    out["s6_lazy_share_inheritune"] = len(target_stats.lazy_layers()) / len(target_stats.max_rank())
    return out


def record_acceptance(key: str, checks: dict[str, float | bool | None]) -> None:
    """``<key>/inheritune/check/<name>`` for each reading of ``acceptance`` (research inheritune.md §5.2)."""
    for name, value in checks.items():
        record(f"{key}/inheritune/check/{name}", value, paper_ref="research inheritune.md §5.2")


def runs_frame(exp: Experiment):
    """One row per run (the variants, then the growth rounds): depth, steps, validation loss and its s.e.,
    parameters, training throughput, MFU (GPU) and seconds."""
    import pandas as pd

    runs = {**exp.runs, **{f"round {r.n_layer}L": r for r in exp.growth.rounds}}
    return pd.DataFrame({name: {"layers": r.n_layer, "steps": r.steps, "val loss": round(r.val_loss, 4),
                                "± s.e.": round(r.val_se, 4), "params": f"{r.n_params:,}",
                                "tokens/s": round(r.tokens_per_s),
                                "MFU": "n/a" if r.mfu is None else f"{r.mfu:.0%}", "train s": round(r.seconds)}
                         for name, r in runs.items()}).T
