# One-command set-up: `make run` (the main job) and `make test` (the test suite) create the
# virtual environment from uv.lock first when needed. No network beyond the package index.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ENV ?= base

# Real datasets: ../shared/datasets on the project machines (read-only); override with
# `make run ATOP_DATA_ROOT=/path` or leave unset to use data/01_raw.
ATOP_DATA_ROOT ?= $(if $(wildcard ../shared/datasets/cifar-10-batches-py),$(abspath ../shared/datasets),)
export ATOP_DATA_ROOT
# No usage telemetry from Kedro, DVC or Great Expectations.
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
# OpenMP's wait policy is left as it is: on an otherwise idle 2-core machine the default
# (idle threads spin a while) runs the stages 1.25-1.5x faster than OMP_WAIT_POLICY=PASSIVE
# (docs/benchmarks.md, "OpenMP wait policy"). The test workers share the cores, so
# tests/conftest.py sets PASSIVE for them; set it yourself when other work runs beside a job.

KEDRO_ENV := $(if $(filter base,$(ENV)),,--env $(ENV))

.PHONY: install data-docs-assets browser run resume run-all repro seeds scaling results test test-fast lint viz clean-data

# The Great Expectations Data Docs' assets that no PyPI package ships (bootstrap-table,
# bootstrap-datepicker, bootstrap-dark), locked in this package-lock.json.
DOCS_ASSETS := src/atop/validation/docs_assets

$(STAMP): pyproject.toml uv.lock $(DOCS_ASSETS)/package-lock.json
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv>=0.5"
	$(PYTHON) -m uv sync --frozen --all-extras --python $(PYTHON)
	$(MAKE) --no-print-directory data-docs-assets
	@touch $(STAMP)

install: $(STAMP)

## The Data Docs' npm assets into the venv (`npm ci`, about 2 s); without npm the Data Docs
## still render offline, their tables drawn plain (a warning says so).
data-docs-assets:
	@$(VENV)/bin/python -m atop.validation.docs_assets install \
		|| echo "warning: Data Docs npm assets not installed; rerun: make data-docs-assets"

## Debian's Chromium for the Data Docs browser test (.ci/run calls this; about 20 s with
## apt-get update). Needs apt-get as root; elsewhere the test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1; then chromium --version 2>/dev/null; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
			|| echo "warning: chromium not installed: the Data Docs browser test will skip"; \
	else echo "warning: no apt-get as root here: the Data Docs browser test will skip"; fi

## The main job: the AToP pipeline on the chosen profile (default: base, 2-core CPU).
run: $(STAMP)
	$(VENV)/bin/kedro run --pipelines atop $(KEDRO_ENV)

## After an interruption: rerun the main job, skipping the stages whose outputs exist
## (a stage interrupted mid-training resumes from its per-epoch resume file).
resume: $(STAMP)
	$(VENV)/bin/kedro run --pipelines atop --only-missing-outputs $(KEDRO_ENV)

## Everything: AToP and the baselines (the default pipeline).
run-all: $(STAMP)
	$(VENV)/bin/kedro run $(KEDRO_ENV)

## DVC: the full comparison (the main job, the baselines, the ablations, the convergence
## study and their report), rerunning only the stages whose code, parameters or inputs
## changed (every stage the first time; profile: params/profile.yaml), with the venv's
## kedro/python on PATH for the stages.
repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro comparison

## The studies run alone (each its own DVC stage, cached): every arm of the 2 x 2 with
## several training seeds, and three arms at larger fine-tuning budgets.
seeds scaling: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro $@

## docs/results.md and the README's results block, regenerated from the committed records
## (data/08_reporting/cifar10/base/*.json); tests/test_results.py fails when they disagree.
results: $(STAMP)
	$(VENV)/bin/python -m atop.results

## The test suite (real data from ../shared/datasets), on two worker processes (one torch
## thread each; a test file stays on one worker, so its module fixtures are built once; the
## longest file starts first: tests/conftest.py orders them).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

## The tests without the slow end-to-end ones (marked `slow`): a quick check while editing.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

viz: $(STAMP)
	$(VENV)/bin/kedro viz build --include-previews
