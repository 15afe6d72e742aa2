"""Massive-weight ablation experiments (HoC Table 1, Fig. 4; SunMA Table 3; Yu et al. super weight).

An ``Attack`` is plain data (kind + JSON-able parameters); ``Attack.context(model)`` turns it into one of
the weight-edit context managers of ``common.hoc.detection``. ``evaluate`` runs perplexity and, optionally, the
zero-shot suite under an attack, cached by (weights, attack, data, tasks), so a re-run or an interrupted
k-sweep resumes where it stopped and only the attacked rows change between points. A result keeps the statistics
its intervals resample (per-window mean NLL, per-item 0/1 per task), so ``record_*`` give every perplexity ratio
and accuracy change its paired 95% interval (``common.core.intervals``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import pandas as pd
import torch

from common.core import arch, data, evaluation, intervals, models, progress
from common.core import tasks as task_sets
from common.core.cache import cached, tensor_digest
from common.core.manifest import record, record_model
from common.hoc import detection, edits, paper

KINDS = ("base", "channels", "super", "hidden", "norm_gain")


@dataclass(frozen=True)
class Attack:
    """One model edit. ``kind``: ``base`` (none), ``channels`` (zero intermediate channels per layer),
    ``super`` (zero one down_proj entry), ``hidden`` (overwrite hidden values, SunMA), ``norm_gain``."""
    name: str
    kind: str
    params: dict = field(default_factory=dict)

    def context(self, model: torch.nn.Module):
        """The context manager that applies this attack to ``model`` and restores it on exit."""
        p = self.params
        if self.kind == "base":
            return contextlib.nullcontext()
        if self.kind == "channels":
            return edits.zero_channels(model, {int(layer): ch for layer, ch in p["channels"].items()})
        if self.kind == "super":
            return edits.zero_super_weight(model, p["layer"], p["hidden_dim"], p["channel"])
        if self.kind == "hidden":
            return edits.set_hidden(model, p["layer"], p["dims"], torch.tensor(p["values"]))
        if self.kind == "norm_gain":
            return edits.set_norm_gain(model, p["layers"], p["dim"], p["gain"])
        raise ValueError(f"unknown attack kind {self.kind!r}; known: {', '.join(KINDS)}")


BASE = Attack("base", "base")


def zero_top(layer: int, ranked: list[int], k: int) -> Attack:
    """HoC top-k zeroing (k = 0 is the unattacked model)."""
    if k == 0:
        return Attack("zero_top0", "base")
    return Attack(f"zero_top{k}", "channels", {"channels": {layer: ranked[:k]}})


def keep_top(layer: int, ranked: list[int], k: int, width: int) -> Attack:
    """HoC top-k retaining: every other up/gate row of the layer zeroed (k = 0 removes the layer's FFN)."""
    return Attack(f"keep_top{k}", "channels", {"channels": {layer: edits.all_but(ranked[:k], width)}})


def random_k(layer: int, k: int, seed: int, width: int, exclude: list[int]) -> Attack:
    """Control: k random non-massive rows of the same layer (k = 0 is the unattacked model)."""
    if k == 0:
        return Attack(f"random_top0_s{seed}", "base")
    return Attack(f"random_top{k}_s{seed}", "channels",
                  {"channels": {layer: edits.random_channels(width, k, seed, exclude)}})


def table1(report: detection.MassiveReport, ranked: list[int], k: int, width: int,
           seeds: tuple[int, ...]) -> list[Attack]:
    """HoC Table 1 rows: base, zero top-k, keep-only top-k, and the random control for each seed.
    Refuses (ValueError) for a model without a massive layer."""
    layer = edits.require_layer(report)
    edits.check_k(k, width)
    return [BASE, zero_top(layer, ranked, k), keep_top(layer, ranked, k, width),
            *[random_k(layer, k, s, width, ranked[:k]) for s in seeds]]


def writer_layers(prompts, dim: int, layer: int, min_abs: float = detection.MIN_ABS) -> list[int]:
    """Layers up to the massive ``layer`` whose FFN branch writes at least ``min_abs`` into hidden ``dim`` at
    position 0 (mean over prompts), with the sign of the massive value: the layers that *build* the massive
    dim (SmolLM2: 1, 2 and 11 for dim 507). Later layers that shrink it are not builders."""
    point = "post_ffn" if "post_ffn" in prompts.pos0 else "mlp_out"
    writes = prompts.pos0[point][:, : layer + 1, dim].mean(0)
    sign = torch.sign(prompts.pos0["hidden"][:, layer, dim].mean(0))
    return (writes * sign >= min_abs).nonzero().flatten().tolist()


def joint_top(prompts, layers: list[int], k: int) -> Attack:
    """Zero the top-k position-0 channels of every layer in ``layers`` at once."""
    chans = {i: detection.top_channels(prompts.pos0["inter"], i, k)[0] for i in layers}
    return Attack(f"joint_top{k}_L{'-'.join(map(str, layers))}", "channels", {"channels": chans})


def hidden_intervention(layer: int, dims: list[int], values: list[float], name: str) -> Attack:
    """SunMA Table 3: set the massive hidden values after ``layer`` at position 0 to ``values``."""
    return Attack(name, "hidden", {"layer": layer, "dims": dims, "values": values})


def evaluate(model: torch.nn.Module, tok, key: str, attack: Attack, windows: torch.Tensor,
             tasks: tuple[str, ...] = (), n_items: int | None = 0, batch_size: int = 4, seed: int = 0,
             eval_batch_size: int = 4) -> dict:
    """Perplexity on ``windows`` (``batch_size`` windows a forward) and the zero-shot ``tasks`` with ``n_items``
    each (lm-eval's requests, ``eval_batch_size`` a forward: a 4096-token window and a 60-token request need
    different batches) under ``attack``, cached.

    Returns ``{"ppl": float, "window_nll": [mean NLL of each window], "tasks": {task: {...}} | None,
    "avg": {...} | None}`` (``tasks``: ``evaluation.zero_shot``'s, with each task's per-item ``correct``).
    """
    cache_key = {"weights": models.weights_id(key), "attack": attack.kind, "params": attack.params,
                 "windows": tensor_digest(windows), "tasks": list(tasks), "n_items": n_items,
                 "batch_size": batch_size, "seed": seed, "dtype": str(next(model.parameters()).dtype),
                 "keeps": "window_nll,answers"}  # older results lack per-window NLLs or zero_shot's answers
    if tasks:  # a perplexity-only result does not depend on it
        cache_key["eval_batch_size"] = eval_batch_size

    def compute() -> dict:
        with attack.context(model):
            nll = evaluation.window_nll(model, windows, batch_size)
            out = {"ppl": math.exp(nll.mean()), "window_nll": nll.tolist(), "tasks": None, "avg": None}
            if tasks:
                per_task = evaluation.zero_shot(model, tok, list(tasks), n_items, seed=seed,
                                                batch_size=eval_batch_size,
                                                prepend_bos=models.get_spec(key).prepend_bos)
                out["tasks"] = per_task
                out["avg"] = evaluation.average_accuracy(per_task)
        return out

    return cached("ablation", cache_key, compute)


def table1_rows(model: torch.nn.Module, tok, key: str, report: detection.MassiveReport, ranked: list[int],
                windows: torch.Tensor, k: int, seeds: tuple[int, ...], tasks: tuple[str, ...], n_items: int | None,
                batch_size: int, eval_batch_size: int) -> dict[str, dict]:
    """Evaluate HoC Table 1's rows for one model (``evaluate``'s two batch sizes). Without a massive layer only
    ``base`` is evaluated."""
    attacks = [BASE]
    if report.found:
        attacks = table1(report, ranked, k, arch.intermediate_size(model, report.layer), seeds)
    rows = {}
    for attack in progress.each(f"HoC Table 1 attacks ({key})", attacks):
        with_tasks = attack.name in ("base", f"zero_top{k}", f"keep_top{k}") or attack.name.endswith("_s0")
        rows[attack.name] = evaluate(model, tok, key, attack, windows, tasks if with_tasks else (), n_items,
                                     batch_size, eval_batch_size=eval_batch_size)
    return rows


def _arms(rows: dict[str, dict], row: str) -> list[str]:
    """The results a Table 1 row stands for: the row itself, or the random row's seeds (``random_top5_s0``, ...)."""
    return sorted(n for n in rows if n.startswith(f"{row}_s")) or [row]


def _ppl_ratio_ci(rows: dict[str, dict], arms: list[str]) -> tuple[list[float], str]:
    """95% paired bootstrap interval over the windows of the mean perplexity ratio of ``arms`` (result names) to
    ``base``, and what it is over (for the record's note)."""
    ratio = intervals.mean_perplexity_ratio([rows[a]["window_nll"] for a in arms], rows["base"]["window_nll"])
    return ratio["ci95"], f"95% paired bootstrap over {ratio['n']} windows"


def _kept_tasks(rows: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(tasks in the model's accuracy means, tasks dropped): a task enters every arm's mean only if the intact
    model's answers to it vary (``evaluation.varying_tasks``)."""
    return evaluation.varying_tasks(rows["base"]["tasks"]) if rows["base"]["tasks"] else ([], [])


def _accuracy(result: dict, kept: list[str]) -> dict | None:
    """``evaluation.average_accuracy`` of one result over the ``kept`` tasks (None without tasks)."""
    return evaluation.average_accuracy({t: result["tasks"][t] for t in kept}) if result["tasks"] and kept else None


def _row_values(rows: dict[str, dict], row: str, k: int, kept: list[str]) -> tuple[float, dict | None, str | None]:
    """(perplexity, accuracy summary over the ``kept`` tasks (``_kept_tasks``), note) of a Table 1 row; the random
    row averages its seeds' perplexities (its accuracy is the first seed's)."""
    if row != f"random_top{k}":
        return rows[row]["ppl"], _accuracy(rows[row], kept), None
    seeds = _arms(rows, row)
    ppls = [rows[n]["ppl"] for n in seeds]
    note = f"mean over {len(seeds)} seeds (ppl {min(ppls):.3f}-{max(ppls):.3f}); accuracy: seed {seeds[0][-1]}"
    return sum(ppls) / len(ppls), _accuracy(rows[seeds[0]], kept), note


def table1_frame(rows: dict[str, dict[str, dict]], k: int) -> pd.DataFrame:
    """HoC Table 1 as a frame indexed (model, attack): ppl, ratio to base, accuracy with its 95% interval."""
    recs = []
    for key, r in rows.items():
        kept = _kept_tasks(r)[0]
        chance = chance_average({t: r["base"]["tasks"][t] for t in kept}) if kept else None
        for row in ("base", f"zero_top{k}", f"keep_top{k}", f"random_top{k}"):
            if row not in r and not any(n.startswith(f"{row}_s") for n in r):
                continue
            ppl, avg, _ = _row_values(r, row, k, kept)
            recs.append({"model": key, "attack": row, "ppl": ppl, "ppl_ratio": ppl / r["base"]["ppl"],
                         "acc": avg["acc"] if avg else None, "acc_lo": avg["ci95"][0] if avg else None,
                         "acc_hi": avg["ci95"][1] if avg else None, "chance": chance})
    return pd.DataFrame(recs).set_index(["model", "attack"])


def chance_average(per_task: dict[str, dict]) -> float:
    """Mean chance level of the tasks (what a random guesser scores on the average)."""
    return sum(t["chance"] for t in per_task.values()) / len(per_task)


def record_table1(key: str, rows: dict[str, dict], k: int, reason: str | None = None) -> None:
    """Record ``M/ppl/{base,zero_topk,keep_topk,random_topk}`` and the same under ``M/acc/`` (DESIGN §9), with
    HoC's Llama-3-8B values beside them (perplexity: Table 1's WikiText-2 column, the corpus we measure on; not its
    three-corpus average). Accuracy is a fraction with its 95% bootstrap interval."""
    kept, dropped = _kept_tasks(rows)
    dropped_note = f"; dropped (the intact model answers them the same way throughout): {dropped}" if dropped else ""
    base_acc = _accuracy(rows["base"], kept)
    for row in ("base", f"zero_top{k}", f"keep_top{k}", f"random_top{k}"):
        paper_ppl, paper_acc = paper.TABLE1_WIKI_PPL.get(row), paper.TABLE1.get(f"acc/{row}")
        ppl_ref = paper.TABLE1_WIKI_REF if paper_ppl is not None else None
        if row != "base" and reason:
            record(f"{key}/ppl/{row}", None, paper=paper_ppl, paper_ref=ppl_ref, note=reason)
            record(f"{key}/acc/{row}", None, paper=paper_acc, paper_ref=paper.TABLE1_REF, note=reason)
            continue
        ppl, avg, note = _row_values(rows, row, k, kept)
        record(f"{key}/ppl/{row}", ppl, paper=paper_ppl, paper_ref=ppl_ref, note=note)
        ci95, over = _ppl_ratio_ci(rows, _arms(rows, row))
        record(f"{key}/ppl_ratio/{row}", ppl / rows["base"]["ppl"], ci95=ci95,
               note=f"perplexity / intact perplexity{' (mean over the seeds)' if row.startswith('random') else ''}; "
                    f"{over}")
        record(f"{key}/acc/{row}", avg["acc"] if avg else None, paper=paper_acc, paper_ref=paper.TABLE1_REF,
               ci95=avg["ci95"] if avg else None,
               note=f"unweighted mean over the zero-shot tasks {kept} (fraction; paper: %), 95% bootstrap "
                    f"interval{dropped_note}")
        if avg and row != "base":
            tasks, base = rows[_arms(rows, row)[0]]["tasks"], rows["base"]["tasks"]
            delta = intervals.stratified_paired_difference({t: tasks[t]["correct"] for t in kept},
                                                           {t: base[t]["correct"] for t in kept})
            record(f"{key}/acc_delta/{row}", avg["acc"] - base_acc["acc"], ci95=delta["ci95"],
                   note=f"accuracy minus intact accuracy (fraction); 95% paired bootstrap over {delta['n']} items, "
                        f"resampled within each task ({delta['n_strata']} in all)")
    if rows["base"]["tasks"]:
        record(f"{key}/acc/chance", chance_average({t: rows["base"]["tasks"][t] for t in kept}),
               note="mean chance level of the tasks in the mean")
        record(f"{key}/acc/dropped_tasks", dropped,
               note="tasks left out of this model's accuracy means: the intact model gives the same answer to every item")


def sweep_frame(results: dict[str, dict], ks: tuple[int, ...]) -> pd.DataFrame:
    """HoC Fig. 4 data: index (attack kind, k), columns ppl and accuracy with its interval, and ``correct``: the
    per-task per-item 0/1 lists the accuracy is the mean of (``{task: [0/1, ...]}``; None without tasks), what
    ``record_sweep``'s paired accuracy changes resample."""
    recs = []
    for kind, prefix in (("zero", "zero_top"), ("keep", "keep_top"), ("random", "random_top")):
        for k in ks:
            name = next(n for n in results if n == f"{prefix}{k}" or n.startswith(f"{prefix}{k}_s"))
            res = results[name]
            avg = res["avg"]
            recs.append({"kind": kind, "k": k, "ppl": res["ppl"], "acc": avg["acc"] if avg else None,
                         "acc_lo": avg["ci95"][0] if avg else None, "acc_hi": avg["ci95"][1] if avg else None,
                         "correct": {t: list(r["correct"]) for t, r in res["tasks"].items()} if res["tasks"] else None})
    return pd.DataFrame(recs).set_index(["kind", "k"])


def circuit_frame(rows: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """The circuit attacks (everything beyond Table 1) per model: perplexity and ratio to the intact model."""
    table1_prefixes = ("base", "zero_top", "keep_top", "random_top")
    recs = [{"model": key, "attack": name, "ppl": res["ppl"], "ppl_ratio": res["ppl"] / r["base"]["ppl"]}
            for key, r in rows.items() for name, res in r.items() if not name.startswith(table1_prefixes)]
    return pd.DataFrame(recs, columns=["model", "attack", "ppl", "ppl_ratio"]).set_index(["model", "attack"])


NO_LAYER = "no detectable massive layer: the attacks refuse rather than zero an arbitrary layer"


def circuit_attacks(model: torch.nn.Module, m: detection.Measurement, ranked: list[int], joint_k: int = 2) -> list[Attack]:
    """The other ends of the circuit, for one model with a massive layer: the joint top-k of every layer
    that writes the massive dim, SunMA's hidden-state zero / mean intervention, Yu et al.'s super weight,
    and (families with a post-FFN norm) silencing the norm gain at the largest dim vs a random dim."""
    r = m.report
    dims = r.hidden_dims
    mean = m.windows.pos0["hidden"][:, r.layer, dims].mean(0).tolist()
    attacks = [hidden_intervention(r.layer, dims, [0.0] * len(dims), "sun_zero"),
               hidden_intervention(r.layer, dims, mean, "sun_mean"),
               Attack("super_weight", "super", {"layer": r.layer, "hidden_dim": dims[0], "channel": ranked[0]})]
    writers = writer_layers(m.prompts, dims[0], r.layer)
    if len(writers) > 1:
        attacks.append(joint_top(m.prompts, writers, joint_k))
    if m.post_norm is not None:
        dim = detection.largest_hidden_dim(m.prompts)
        gain, median = torch.tensor(m.post_norm["gain"]).abs(), torch.tensor(m.post_norm["median_gain"])
        layers = (gain >= 10 * median).nonzero().flatten().tolist()
        width = len(m.prompts.pos0["hidden"][0, 0])
        control = edits.random_channels(width, 1, seed=0, exclude=[dim])[0]
        attacks += [Attack("norm_gain_zero", "norm_gain", {"layers": layers, "dim": dim, "gain": 0.0}),
                    Attack("norm_gain_zero_random_dim", "norm_gain", {"layers": layers, "dim": control, "gain": 0.0})]
    return attacks


def k_sweep(layer: int, ranked: list[int], ks: tuple[int, ...], width: int, seed: int = 0) -> list[Attack]:
    """HoC Fig. 4: zero / keep-only / random for every k (k = 0: base for zero and random, no FFN for keep)."""
    return [a for k in ks for a in (zero_top(layer, ranked, k), keep_top(layer, ranked, k, width),
                                    random_k(layer, k, seed, width, ranked[:max(ks)]))]


def attack_model(key: str, cfg) -> tuple[detection.Measurement, list[int], dict[str, dict], torch.Tensor]:
    """Notebook 02 for one model (``cfg``: its profile): load it, detect (notebook 01's criterion) and rank the
    massive layer's channels up to the largest k of the sweep, evaluate and record HoC Table 1's rows, then the
    circuit attacks (models with a massive layer). Returns (measurement, ranked channels, rows, windows)."""
    model, tok = models.load_model(key)
    record_model(key)
    windows = data.token_windows(tok, key, cfg.corpus, cfg.n_windows, cfg.window_len)
    m = detection.measure(model, tok, key, cfg.prompts, windows, cfg.k, cfg.batch_size)
    r = m.report
    ranked = detection.top_channels(m.prompts.pos0["inter"], r.layer, max(cfg.k_grid))[0] if r.found else []
    rows = table1_rows(model, tok, key, r, ranked, windows, cfg.k, cfg.seeds, cfg.tasks, cfg.n_items,
                       cfg.batch_size, cfg.eval_batch_size)
    record_table1(key, rows, cfg.k, reason=None if r.found else NO_LAYER)
    if r.found:
        rows.update({a.name: evaluate(model, tok, key, a, windows, batch_size=cfg.batch_size)
                     for a in progress.each(f"circuit attacks ({key})", circuit_attacks(model, m, ranked))})
    del model
    return m, ranked, rows, windows


def table7_frame(measured: dict[str, detection.Measurement], ranked: dict[str, list[int]], k: int) -> pd.DataFrame:
    """HoC Table 7 for the models run: massive layer, top-5 channels, hidden dims and the 2·k·d attacked weights."""
    return pd.DataFrame({key: {"massive layer (0-based)": m.report.layer, "top-5 channels": ranked[key][:5],
                               "hidden dims": m.report.hidden_dims,
                               "params attacked (2·k·d)": 2 * k * len(m.prompts.pos0["hidden"][0, 0])
                               if m.report.found else None}
                         for key, m in measured.items()}).T


def record_table7(measured: dict[str, detection.Measurement], ranked: dict[str, list[int]], k: int) -> None:
    """``M/table7/top5``: the top-5 channels of each model's massive layer (``null`` without one); then, per model,
    ``M/table7/massive_layer`` and ``M/table7/params_attacked`` (the 2·k·d weights of the top-k attack)."""
    for key in measured:
        record(f"{key}/table7/top5", ranked[key][:5] or None, paper_ref="HoC Table 7",
               note="0-based channels at the massive layer")
    for key, m in measured.items():
        record(f"{key}/table7/massive_layer", m.report.layer, note="0-based; null: no massive layer")
        record(f"{key}/table7/params_attacked",
               2 * k * len(m.prompts.pos0["hidden"][0, 0]) if m.report.found else None,
               note=f"2·k·d up/gate weights zeroed by the top-{k} attack")


def run_sweep(key: str, cfg, windows: torch.Tensor, layer: int, ranked: list[int]) -> pd.DataFrame:
    """HoC Fig. 4 on ``key`` (``cfg``: notebook 02's profile): every attack of ``k_sweep`` on the same windows,
    perplexity for all and the sweep tasks' accuracy for zero and keep-only; ``sweep_frame`` of the results."""
    model, tok = models.load_model(key)
    width = arch.intermediate_size(model, layer)
    sweep = {a.name: evaluate(model, tok, key, a, windows, () if a.name.startswith("random") else cfg.sweep_tasks,
                              cfg.sweep_n_items, cfg.batch_size, eval_batch_size=cfg.eval_batch_size)
             for a in progress.each(f"HoC Fig. 4 k-sweep ({key})", k_sweep(layer, ranked, cfg.k_grid, width))}
    del model
    return sweep_frame(sweep, cfg.k_grid)


#: The sweep's accuracy changes with an interval: (kind, k) against the intact model (zero, k = 0).
SWEEP_DELTAS = (("zero", 3), ("keep", 1))


def sweep_acc_delta(frame: pd.DataFrame, kind: str, k: int, ks: tuple[int, ...]) -> tuple[dict | None, str]:
    """Accuracy of ``kind`` at ``k`` minus the intact model's (``zero`` at k = 0), the unweighted mean over the
    sweep tasks of the per-task differences, paired over items and resampled within each task
    (``intervals.stratified_paired_difference`` of ``frame``'s ``correct`` lists). Returns (the difference, or
    None with why, the note)."""
    missing = [x for x in (0, k) if x not in ks]
    if missing:
        return None, f"k = {missing} not in this profile's k_grid {list(ks)}: not measured"
    treated, intact = frame.loc[(kind, k), "correct"], frame.loc[("zero", 0), "correct"]
    if not treated or not intact:
        return None, "no sweep tasks on this profile: no accuracy to compare"
    diff = intervals.stratified_paired_difference(treated, intact)
    what = f"top-{k} massive rows zeroed" if kind == "zero" else f"only the top-{k} row{'s' if k > 1 else ''} of the massive layer kept"
    return diff, (f"accuracy ({what}) minus the intact model's (k = 0), fraction, unweighted mean over the tasks; "
                  f"95% paired bootstrap over {diff['n']} items, resampled within each task ({diff['n_strata']} in all)")


def record_sweep(key: str, frame: pd.DataFrame, ks: tuple[int, ...], tasks: tuple[str, ...], n_items) -> None:
    """``M/sweep/<kind>/ppl`` for zero, keep and random and ``M/sweep/<kind>/acc`` for zero and keep (lists over
    ``ks``, HoC Fig. 4); then ``M/sweep/zero/acc_delta_k3`` and ``M/sweep/keep/acc_delta_k1`` (``sweep_acc_delta``:
    the change from the intact model with its paired interval over items; null with the reason where the profile's
    k_grid or tasks lack it)."""
    for kind in ("zero", "keep", "random"):
        record(f"{key}/sweep/{kind}/ppl", frame.loc[kind, "ppl"].tolist(), note=f"k = {list(ks)}")
        if kind != "random":
            record(f"{key}/sweep/{kind}/acc", frame.loc[kind, "acc"].tolist(),
                   note=f"k = {list(ks)}; tasks {list(tasks)}, {task_sets.describe_items(tasks, n_items)}")
    for kind, k in SWEEP_DELTAS:
        diff, note = sweep_acc_delta(frame, kind, k, ks)
        record(f"{key}/sweep/{kind}/acc_delta_k{k}", diff["value"] if diff else None,
               ci95=diff["ci95"] if diff else None, note=note)


def record_circuit(rows: dict[str, dict[str, dict]]) -> None:
    """``M/circuit/<attack>/ppl_ratio`` for every circuit attack of ``circuit_frame(rows)``, with its 95% paired
    bootstrap interval over the windows."""
    for (key, attack), ratio in circuit_frame(rows)["ppl_ratio"].items():
        ci95, over = _ppl_ratio_ci(rows[key], [attack])
        record(f"{key}/circuit/{attack}/ppl_ratio", ratio, ci95=ci95, note=f"perplexity / intact perplexity; {over}")
