# PureBench. `make help` lists the targets; every target sets up .venv itself when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PUREBENCH := $(VENV)/bin/purebench
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install data bench test test-full lint leaderboard clean perf browser gpu-check

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## .*$$' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install purebench with its dev extras

data: $(STAMP) ## obtain Fashion-MNIST (Debian's dataset-fashion-mnist, else torchvision's download)
	$(PUREBENCH) data fashion_mnist --download

# The default leaderboard: every defense in conf/defense/ behind the standard SmallCNN, and CARSO
# (which needs an adversarially trained classifier) with the AT baseline, at the quick profile.
# Records go to results/bench/ (committed); the leaderboard is built from them alone.
# BENCH_JOBS runs in parallel (joblib), one torch thread each: on 2 cores two single-threaded jobs
# finish sooner than one job on two threads (small convolutions barely parallelise).
BENCH_JOBS ?= 2
BENCH := $(PY) -m bench --multirun profile=quick threads=1 hydra/launcher=joblib \
	hydra.launcher.n_jobs=$(BENCH_JOBS) hydra.sweep.dir=results/bench/$$sweep \
	hydra.callbacks.leaderboard.records=results/bench hydra.callbacks.leaderboard.out=results

bench: data ## train what is missing, evaluate every defense on Fashion-MNIST (quick profile), write the leaderboard
	sweep=standard; $(BENCH) classifier=small_cnn 'defense=glob(*,exclude=carso*)'
	sweep=adversarial; $(BENCH) classifier=small_cnn_at defense=none,carso,carso_z0,carso_mean,carso_vote
	cat results/leaderboard.md

perf: $(STAMP) ## benchmark the evaluation engine on Fashion-MNIST (results/perf.md, results/perf.json)
	$(PY) -m bench.tools.perf

# Needs CUDA (without it: one line, exit status 2, before any work); sized for 8 minutes on one GPU.
# GPU_CHECK_ARGS passes options on, e.g. GPU_CHECK_ARGS="--device cpu --tiny" tests the steps.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP) ## on a GPU: pytest -m gpu, bf16 / channels-last / compile vs fp32, a paper row (results/gpu.md)
	$(PY) -m bench.tools.gpu_check $(GPU_CHECK_ARGS)

leaderboard: $(STAMP) ## rebuild results/leaderboard.{md,csv,html} from make bench's records (results/bench)
	$(PUREBENCH) leaderboard results/bench --out results

# The browser test of the leaderboard page needs Debian's chromium-driver; installed where we
# may (root with apt-get), else that test skips and says why.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get install -y chromium chromium-driver; } \
	  || echo "chromium-driver is not installed: the browser tests will skip"

test: $(STAMP) browser ## run the fast tests (no slow, no GPU)
	$(PY) -m pytest -m "not slow and not gpu"

test-full: $(STAMP) browser ## run every test, slow ones included
	$(PY) -m pytest

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check bench defenses attacks tests
	$(VENV)/bin/ruff format --check bench defenses attacks tests

clean: ## remove run outputs (results/runs, results/multiruns); keeps trained classifiers
	rm -rf results/runs results/multiruns
