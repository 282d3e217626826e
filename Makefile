# glmops — every target is a thin wrapper over the real command it prints.
# `make test` and `make demo` work from a fresh clone: they create .venv and install into it.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := models/tiny-chatglm2

# Keep Ray on loopback and its auth explicit (docs: ../shared/docs/stack-notes.md §4, §6).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0
export RAY_USAGE_STATS_ENABLED := 0
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test test-fast demo tiny-model finetune merge evaluate serve chat mlflow-ui ray-head lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "glmops needs Python >= 3.11"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# CPU torch first (a local build); GPU users install a CUDA torch before this (README).
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install glmops with its test extras

$(TINY)/config.json: $(STAMP) common/models/tiny_model.py data/sample.json
	$(PY) -m common.models.tiny_model --output_dir $(TINY)

tiny-model: $(TINY)/config.json  ## write the tiny offline model to models/tiny-chatglm2

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(STAMP)  ## the tests that need no Ray, MLflow or Serve
	$(PY) -m pytest -q -ra -m 'not slow'

demo: $(TINY)/config.json  ## the whole pipeline on the tiny model, on CPU
	$(PY) -m jobs.demo

finetune: $(TINY)/config.json  ## fine-tune (ARGS="--base_model ... --data_path ...")
	$(PY) jobs/finetune.py $(ARGS)

merge: $(STAMP)  ## merge an adapter and register it (ARGS="--run_id ...")
	$(PY) jobs/merge.py $(ARGS)

evaluate: $(STAMP)  ## score models by generation (ARGS="--compare base,models:/name@champion --data_path ...")
	$(PY) jobs/evaluate.py $(ARGS)

serve: $(STAMP)  ## serve a model (ARGS="model=models:/<name>@champion")
	$(VENV)/bin/serve run serving:app $(ARGS)

chat: $(STAMP)  ## terminal client against a running server (ARGS="--url http://127.0.0.1:8000")
	$(PY) -m serving.client $(ARGS)

mlflow-ui: $(STAMP)  ## the MLflow UI on the project's local store, http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# Jobs run with this head's environment: the venv's python, and the project's MLflow store unless one is set.
ray-head: $(STAMP)  ## a local Ray head on loopback for `ray job submit --address http://127.0.0.1:8265` (stop: ray stop)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	$(VENV)/bin/ray start --head --node-ip-address 127.0.0.1 --port 6390 --include-dashboard true \
	    --dashboard-host 127.0.0.1 --dashboard-port 8265 --disable-usage-stats

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check common jobs serving tests data

clean:  ## remove generated models, runs and caches (not .venv)
	rm -rf models/tiny-chatglm2 output .pytest_cache
