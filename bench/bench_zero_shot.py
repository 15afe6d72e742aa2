"""Zero-shot multiple choice (issue 20, CPU speed): items/s of lm-eval's stock ``HFLM`` against the shared-prefix
backend ``zero_shot`` uses (``common.core.prefix_lm.SharedPrefixHFLM``: each context runs once for all its
choices), both on the same in-memory model, side by side in one process.

The requests are lm-eval's for the ``small`` profile's zero-shot tasks (notebook 03: wiki_mc, wiki_topic,
wiki_cloze, commonsense; 20 items each; context ``query``, continuation ``" " + choice``), scored with
``loglikelihood`` at ``zero_shot``'s batch size. Checked first: the same (log-likelihood, is-greedy) per request
to 1e-4. Ratio: shared-prefix items/s over stock HFLM items/s, over all tasks and per task.

    python bench/bench_zero_shot.py [--models smollm2-135m ...] [--threads N]
"""

import argparse
import inspect

import torch
from common_bench import interleaved, save
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from common.core import evaluation, models, profiles, tasks
from common.core.prefix_lm import SharedPrefixHFLM

NOTEBOOK, TOL = "03_macdrop_finetuning", 1e-4
BATCH = inspect.signature(evaluation.zero_shot).parameters["batch_size"].default


def instances(task: str, n_items: int) -> list[Instance]:
    """lm-eval's loglikelihood requests of ``task``: one per choice of each of its ``n_items`` docs."""
    return [Instance("loglikelihood", {}, tuple(pair), k)
            for doc in tasks.requests(task, n_items) for k, pair in enumerate(doc["pairs"])]


def bench_model(key: str, cfg) -> dict:
    model, tok = models.load_model(key)
    lms = {"hflm": HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, device=str(model.device)),
           "shared_prefix": SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=BATCH,
                                             device=str(model.device))}
    reqs = {t: instances(t, cfg.n_items) for t in cfg.tasks}
    worst = 0.0
    for t, insts in reqs.items():
        want, got = (lm.loglikelihood(insts, disable_tqdm=True) for lm in lms.values())
        assert all(a[1] == b[1] for a, b in zip(want, got, strict=True)), f"{key} {t}: is-greedy differs"
        worst = max(worst, *(abs(a[0] - b[0]) for a, b in zip(want, got, strict=True)))
    assert worst <= TOL, f"{key}: log-likelihoods differ by {worst} > {TOL}"
    times = interleaved({f"{side}/{t}": (lambda lm=lm, insts=insts: lm.loglikelihood(insts, disable_tqdm=True))
                         for t, insts in reqs.items() for side, lm in lms.items()}, repeats=3, warmup=0)
    total = {side: sum(times[f"{side}/{t}"] for t in reqs) for side in lms}
    items = cfg.n_items * len(reqs)
    ratios = {"shared_prefix_over_hflm_items_per_s": total["hflm"] / total["shared_prefix"],
              **{f"{t}_items_per_s": times[f"hflm/{t}"] / times[f"shared_prefix/{t}"] for t in reqs}}
    for name, r in ratios.items():
        print(f"{key:14s} {name:40s} {r:6.3f}x")
    print(f"{key}: {items / total['hflm']:.2f} items/s stock HFLM, {items / total['shared_prefix']:.2f} shared prefix; "
          f"max |log-likelihood difference| {worst:.2e} over {sum(map(len, reqs.values()))} requests")
    return {"seconds": times, "items_per_s": {side: items / s for side, s in total.items()},
            "requests": {t: len(r) for t, r in reqs.items()}, "max_abs_loglikelihood_difference": worst,
            "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 on a shared box: OpenMP threads that compete with another "
                             "process make forwards up to 10x slower at random)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = profiles.load_config(NOTEBOOK, "small")
    per_model = {key: bench_model(key, cfg) for key in args.models}
    first = per_model[args.models[0]]
    print("->", save("zero_shot", {
        "model": ", ".join(args.models), "tasks": list(cfg.tasks), "n_items": cfg.n_items, "batch_size": BATCH,
        "per_model": per_model, "ratios": first["ratios"] if len(per_model) == 1 else
        {f"{key}: {name}": r for key, res in per_model.items() for name, r in res["ratios"].items()},
        "reference": "lm-eval HFLM.loglikelihood (stock), same model, requests and batch size",
        "target": "shared prefix / HFLM items/s >= 3"}))


if __name__ == "__main__":
    main()
