"""Evaluation of fine-tuned arms for notebook 03 (House of Cards Tables 3–5, Fig. 6).

Each fine-tuned model (``finetune.FineTune``) is scored once, cached by its adapter: held-out
instruction loss and zero-shot accuracy intact (Table 3), and under the top-k zeroing attack (Table 4):
the pre-trained rows of the base weight zeroed with the adapter active and unmerged (primary, the
condition MacDrop trains for) and the merged reading (the channels forced to zero, as if the adapter were
merged and the merged rows zeroed; research §6.9). Arms trained with the same seed share the data order
and the adapter initialisation, so MacDrop's effect is read from *paired* per-seed differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy import stats

from common.core import evaluation, models, progress
from common.core.cache import cached, tensor_digest
from common.core.data import pad_id as pad_token_id
from common.core.manifest import record
from common.core.profiles import PROFILE_NAMES, load_config
from common.hoc import detection, edits, finetune, paper
from common.hoc.finetune import FineTune, load_tuned


@dataclass(frozen=True)
class EvalSpec:
    """What every arm is scored on: held-out examples, zero-shot tasks, and the attack's k."""
    val: tuple  # tokenised held-out instruction examples (data.tokenize_pairs)
    tasks: tuple[str, ...]
    n_items: int | None
    k_attack: int = 3
    batch_size: int = 8
    attack_tasks: bool = True  # also run the zero-shot tasks under the attack (Table 4)


def eval_spec(cfg, key: str, val: list[dict]) -> EvalSpec:
    """Notebook 03's ``EvalSpec`` for ``key`` (``cfg``: its MacDropConfig; ``val``: ``finetune.datasets``' held-out
    examples): the profile's tasks, none for a ``loss_only`` model."""
    return EvalSpec(tuple(val), () if key in cfg.loss_only else cfg.tasks, cfg.n_items, cfg.k_attack, cfg.batch_size)


def grid_spec(cfg, spec: EvalSpec) -> EvalSpec:
    """The grid arms' spec: the grid's tasks, no zero-shot under the attack."""
    return replace(spec, tasks=cfg.grid_tasks, attack_tasks=False)


def evaluate(key: str, tuned: FineTune | None, layer: int | None, channels: list[int], spec: EvalSpec,
             pad_id: int) -> dict:
    """Score one fine-tuned model (``tuned=None``: the pre-trained model), cached by its adapter.

    Returns ``{"loss", "acc", "tasks"}`` and, when the model has a massive layer, ``loss_zero``,
    ``loss_zero_merged``, ``acc_zero`` (accuracy entries are ``evaluation.average_accuracy`` dicts)."""
    val_digest = tensor_digest(torch.tensor([t for ex in spec.val for t in ex["input_ids"]]))
    cache_key = {"weights": models.weights_id(key), "adapter": tuned.path.name if tuned else None,
                 "layer": layer, "channels": channels[:spec.k_attack], "val": val_digest, "n_val": len(spec.val),
                 "tasks": list(spec.tasks), "n_items": spec.n_items, "attack_tasks": spec.attack_tasks,
                 "batch_size": spec.batch_size}

    def compute() -> dict:
        model, tok = load_tuned(key, tuned) if tuned else models.load_model(key)
        bos = models.get_spec(key).prepend_bos

        def score(with_tasks: bool) -> tuple[float, dict | None, dict | None]:
            loss = evaluation.response_loss(model, list(spec.val), pad_id, spec.batch_size)
            if not with_tasks or not spec.tasks:
                return loss, None, None
            per_task = evaluation.zero_shot(model, tok, list(spec.tasks), spec.n_items, batch_size=spec.batch_size,
                                            prepend_bos=bos)
            return loss, evaluation.average_accuracy(per_task), {t: r["acc"] for t, r in per_task.items()}

        out = dict(zip(("loss", "acc", "tasks"), score(True), strict=True))
        if layer is not None:
            top = {layer: channels[:spec.k_attack]}
            with edits.zero_channels(model, top):
                out["loss_zero"], out["acc_zero"], out["tasks_zero"] = score(spec.attack_tasks)
            with edits.silence_channels(model, top):
                out["loss_zero_merged"] = score(False)[0]
        return out

    return cached("macdrop_eval", cache_key, compute)


def runs_frame(results: dict[tuple[str, str, int], dict]) -> pd.DataFrame:
    """One row per (model, arm, seed): losses, accuracies, and what the attack costs."""
    recs = []
    for (key, arm, seed), r in results.items():
        row = {"model": key, "arm": arm, "seed": seed, "loss": r["loss"],
               "acc": r["acc"]["acc"] if r.get("acc") else np.nan}
        if "loss_zero" in r:
            row.update(loss_zero=r["loss_zero"], loss_zero_merged=r["loss_zero_merged"],
                       acc_zero=r["acc_zero"]["acc"] if r.get("acc_zero") else np.nan)
            row.update(loss_delta=row["loss_zero"] - row["loss"],
                       loss_delta_merged=row["loss_zero_merged"] - row["loss"],
                       acc_delta=row["acc_zero"] - row["acc"])
        recs.append(row)
    return pd.DataFrame(recs).set_index(["model", "arm", "seed"]).sort_index()


def paired_difference(treated: pd.Series, control: pd.Series) -> dict | None:
    """Mean of the per-seed differences ``treated - control`` (seeds paired by index) with a 95% t-interval
    (``None`` with one seed), and the seeds' values; ``None`` when the quantity was not measured."""
    common_seeds = treated.index.intersection(control.index)
    if len(common_seeds) == 0:
        raise ValueError("no seed is shared by the two arms: pair arms trained with the same seeds")
    diff = (treated.loc[common_seeds] - control.loc[common_seeds]).to_numpy(dtype=float)
    diff = diff[~np.isnan(diff)]
    n = len(diff)
    if n == 0:
        return None
    mean = float(diff.mean())
    ci = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "n": n, "values": diff.tolist()}


def macdrop_effects(frame: pd.DataFrame, key: str, plain: str, treated: str) -> dict[str, dict]:
    """MacDrop's paired effects for one model: accuracy and loss gains (Table 3) and robustness, i.e. how
    much less the attack costs (Table 4; positive = MacDrop more robust)."""
    a, b = frame.loc[(key, plain)], frame.loc[(key, treated)]
    out = {"acc_gain": paired_difference(b["acc"], a["acc"]),
           "loss_gain": paired_difference(a["loss"], b["loss"])}
    if "loss_delta" in frame:
        out.update(robust_loss=paired_difference(a["loss_delta"], b["loss_delta"]),
                   robust_loss_merged=paired_difference(a["loss_delta_merged"], b["loss_delta_merged"]),
                   robust_acc=paired_difference(b["acc_zero"], a["acc_zero"]))
    return out


ARMS_REQUIRED = ("lora", "lora_macdrop", "dora", "dora_macdrop")  # DESIGN §9


def record_arms(frame: pd.DataFrame, key: str, k_attack: int) -> None:
    """``M/macdrop/<arm>/{acc, acc_zero_top3, loss, loss_zero_top3, loss_zero_top3_merged}`` (mean over
    seeds; DESIGN §9) with HoC's Llama-3-8B values beside the accuracies; ``null`` with the reason for an
    arm or a quantity this profile does not measure on ``key``."""
    names = {"acc": "acc", "acc_zero": f"acc_zero_top{k_attack}", "loss": "loss",
             "loss_zero": f"loss_zero_top{k_attack}", "loss_zero_merged": f"loss_zero_top{k_attack}_merged"}
    ran = frame.loc[key].index.get_level_values("arm")
    for arm in dict.fromkeys([*ARMS_REQUIRED, *ran]):
        paper_values = paper.TABLE34.get(arm, {})
        if arm not in ran:
            for name in ("acc", f"acc_zero_top{k_attack}"):
                record(f"{key}/macdrop/{arm}/{name}", None, paper=paper_values.get(name),
                       paper_ref=paper.TABLE34_REF if name in paper_values else None,
                       note="arm not run on this model in this profile")
            continue
        rows = frame.loc[(key, arm)]
        seeds = rows.index.tolist()
        for col, name in names.items():
            values = rows[col].to_numpy(dtype=float) if col in rows else np.array([np.nan])
            unit = "fraction; paper: %" if col.startswith("acc") else "held-out response NLL (nats/token)"
            measured = not np.isnan(values).all()
            spread = f" (min {values.min():.4f}, max {values.max():.4f})" if measured and len(values) > 1 else ""
            note = (f"mean over seeds {seeds}{spread}; {unit}" if measured
                    else "not measured on this model in this profile (held-out loss only: CPU budget)")
            record(f"{key}/macdrop/{arm}/{name}", float(values.mean()) if measured else None,
                   paper=paper_values.get(name), paper_ref=paper.TABLE34_REF if name in paper_values else None,
                   note=note)
            if measured and len(values) > 1:
                record(f"{key}/macdrop/{arm}/{name}_seeds", values.tolist(), note=f"seeds {seeds}")


def grid_frame(results: dict[str, dict], arms: dict) -> pd.DataFrame:
    """HoC Table 5 / Fig. 6 data: one row per grid arm with its schedule kind, p0, scope, loss and accuracy."""
    recs = [{"arm": name, "kind": arm.schedule.kind if arm.schedule else "none",
             "p0": arm.schedule.p0 if arm.schedule else 0.0, "scope": arm.scope, "loss": results[name]["loss"],
             "acc": results[name]["acc"]["acc"] if results[name].get("acc") else np.nan}
            for name, arm in arms.items()]
    return pd.DataFrame(recs).set_index("arm")


def record_effects(key: str, plain: str, effects: dict[str, dict]) -> None:
    """``M/macdrop/effect/<plain>/<quantity>``: paired MacDrop-minus-plain differences with 95% t-intervals."""
    notes = {"acc_gain": "zero-shot accuracy, MacDrop minus plain (fraction; HoC Table 3: +0.003..+0.009)",
             "loss_gain": "held-out loss, plain minus MacDrop (positive: MacDrop better)",
             "robust_loss": "loss increase under the attack, plain minus MacDrop (positive: MacDrop more robust; "
                            "adapter unmerged)",
             "robust_loss_merged": "the same with the adapter merged before the rows are zeroed",
             "robust_acc": "accuracy under the attack, MacDrop minus plain (HoC Table 4: +0.07 LoRA, +0.32 DoRA)"}
    for name, eff in effects.items():
        if eff is None:
            continue
        record(f"{key}/macdrop/effect/{plain}/{name}", eff["mean"], ci95=eff["ci95"],
               note=f"{notes[name]}; paired over {eff['n']} seed(s): {[round(v, 4) for v in eff['values']]}")
        if eff["ci95"] is not None:
            record(f"{key}/macdrop/effect/{plain}/{name}_ci_low", eff["ci95"][0],
                   note="lower end of the paired 95% t-interval: > 0 means the seeds support the effect")


def record_pretrained(key: str, base: dict, k_attack: int) -> None:
    """``M/macdrop/pretrained/{loss, loss_zero_top<k>, acc}``: the pre-trained model's scores (``evaluate`` with
    ``tuned=None``), the reference line of Tables 3-4."""
    record(f"{key}/macdrop/pretrained/loss", base["loss"], note="held-out loss of the pre-trained model")
    record(f"{key}/macdrop/pretrained/loss_zero_top{k_attack}", base["loss_zero"])
    if base["acc"]:
        record(f"{key}/macdrop/pretrained/acc", base["acc"]["acc"], ci95=base["acc"]["ci95"])


def record_tables34(frame: pd.DataFrame, base: dict[str, dict], runs, k_attack: int) -> dict[tuple[str, str], dict]:
    """Notebook 03's Tables 3-4 records: every model's arms (``record_arms``) and pre-trained scores, then
    MacDrop's paired effects (``record_effects``) for each LoRA / DoRA pair that ``runs`` (the profile's
    ``(model, arms, seeds)``) trains with and without MacDrop. Returns the effects by (model, plain arm)."""
    for key in dict.fromkeys(frame.index.get_level_values("model")):
        record_arms(frame, key, k_attack)
        record_pretrained(key, base[key], k_attack)
    effects = {}
    for key, arms, _ in runs:
        for plain in ("lora", "dora"):
            if {plain, f"{plain}_macdrop"} <= set(arms):
                effects[key, plain] = macdrop_effects(frame, key, plain, f"{plain}_macdrop")
                record_effects(key, plain, effects[key, plain])
    return effects


def effects_frame(effects: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """The paired effects as a table: one row per (model, plain arm, quantity) with mean, 95% interval, seeds."""
    return pd.DataFrame({(key, plain, name): {"mean": e["mean"], "ci95": e["ci95"], "seeds": e["n"]}
                         for (key, plain), eff in effects.items() for name, e in eff.items() if e}).T


def run_grid(cfg, key: str, massive_rows: tuple[int, list[int]], tok, spec: EvalSpec,
             train: list[dict]) -> tuple[pd.DataFrame, dict, int]:
    """HoC Table 5 / Fig. 6 on ``key`` (``cfg``: notebook 03's profile): plain LoRA and every grid arm, one seed,
    the grid's settings and tasks (no zero-shot under the attack). Returns (``grid_frame``, plain LoRA's
    scores, its optimizer steps)."""
    layer, channels = massive_rows
    pad, spec = pad_token_id(tok), grid_spec(cfg, spec)
    arms = finetune.grid_arms(cfg.grid_kinds, cfg.grid_p0s, cfg.scope_ps)

    def tune(arm: finetune.Arm) -> FineTune:
        return finetune.finetune(key, arm, cfg.seed, cfg.grid_settings, train, layer, channels)

    plain = tune(finetune.ARMS["lora"])
    baseline = evaluate(key, plain, layer, channels, spec, pad)
    grid = grid_frame({name: evaluate(key, tune(arm), layer, channels, spec, pad)
                       for name, arm in progress.each(f"MacDrop grid ({key})", arms.items())}, arms)
    return grid, baseline, plain.steps


def record_grid(key: str, grid: pd.DataFrame, baseline: dict, steps: int) -> None:
    """``M/macdrop/grid/exp_alpha`` (the paper's alpha scaled to ``steps``) and ``M/macdrop/grid/<arm>/loss_gain``
    (plain LoRA's held-out loss minus the arm's)."""
    record(f"{key}/macdrop/grid/exp_alpha", finetune.Schedule("exp").alpha_for(steps),
           note=f"{paper.EXP_ALPHA:g} x {paper.T_STEPS} / T, T = {steps}")
    for name, row in grid.iterrows():
        record(f"{key}/macdrop/grid/{name}/loss_gain", baseline["loss"] - row["loss"], note="vs plain LoRA, one seed")


def shard_jobs(cfg, grid: bool, shard: int = 0, shards: int = 1) -> list[tuple[str, str | None, int]]:
    """Shard ``shard`` of ``shards`` of notebook 03's scoring jobs (model, arm or None for the pre-trained model,
    seed): every model of the runs with its arms and seeds, or with ``grid`` plain LoRA and the grid arms."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard}/{shards}: need 0 <= shard < shards")
    if grid:
        names = ["lora", *finetune.grid_arms(cfg.grid_kinds, cfg.grid_p0s, cfg.scope_ps)]
        jobs = [(cfg.grid_model, name, cfg.seed) for name in names]
    else:
        jobs = [job for key, arms, seeds in cfg.runs for job in [(key, None, 0)] + [(key, a, s) for a in arms
                                                                                  for s in seeds]]
    return list(dict.fromkeys(jobs))[shard::shards]


def main(argv: list[str] | None = None) -> None:
    """Score notebook 03's fine-tuned arms (already trained) into the cache the notebook reads, a share per
    process and GPU: ``CUDA_VISIBLE_DEVICES=i python -m common.hoc.scoring --profile paper --shard i/8`` for i
    in 0..7 (``make macdrop-score GPUS=8``). Each process scores whole arms exactly as the notebook does (held-out
    loss, zero-shot, under the attack), so the cache entries are the notebook's own."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.hoc.scoring", description=main.__doc__)
    parser.add_argument("--profile", required=True, choices=PROFILE_NAMES)
    parser.add_argument("--grid", action="store_true", help="the Table 5 / Fig. 6 grid arms instead of the main runs")
    parser.add_argument("--shard", default="0/1", help="I/N: this process's share of the jobs (default all)")
    parser.add_argument("--notebook-seed", type=int, default=0, help="the notebook's SEED (0 as shipped)")
    args = parser.parse_args(argv)
    shard, shards = (int(x) for x in args.shard.split("/"))
    cfg = load_config(finetune.NOTEBOOK, args.profile, args.notebook_seed)
    jobs = shard_jobs(cfg, args.grid, shard, shards)
    arms = {**finetune.ARMS, **finetune.grid_arms(cfg.grid_kinds, cfg.grid_p0s, cfg.scope_ps)}
    for key in dict.fromkeys(k for k, _, _ in jobs):
        model, tok = models.load_model(key)
        layer, channels = detection.massive_weights(model, [models.encode(tok, key, p) for p in cfg.prompts], cfg.k)
        del model
        train, val = finetune.datasets(cfg, key, tok)
        spec, settings = eval_spec(cfg, key, val), cfg.settings
        if args.grid:
            spec, settings = grid_spec(cfg, spec), cfg.grid_settings
        for _, arm, seed in (j for j in jobs if j[0] == key):
            tuned = arm and finetune.finetune(key, arms[arm], seed, settings, train, layer, channels, cached_only=True)
            res = evaluate(key, tuned, layer, channels, spec, pad_token_id(tok))
            print(f"shard {shard}/{shards}: {key} {arm or 'pre-trained'} seed {seed}: held-out loss {res['loss']:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
