# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install, run the main job on the built-in dataset
#   make test   create .venv if needed, run the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint bench-ingest browser clean gpu-check

# the `sepp curate` browser tests drive Debian's chromium through chromedriver (never a
# browser downloaded at run time); installed here when missing (needs root, as on CI)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && apt-get install -y -q chromium chromium-driver; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade -q pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# lightly is only the tests' oracle for the losses; --no-deps keeps its training stack
	# (pytorch-lightning, hydra) out, which would downgrade a package moto needs
	$(BIN)/python -m pip install -q --no-deps lightly==1.6.0
	touch $(STAMP)

run: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/sepp pipeline --config jobs/pipeline-digits.yaml work=$(RUNS)/pipeline

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check sepp_ray tests benchmarks
	$(BIN)/mypy sepp_ray

bench-ingest: $(STAMP)
	$(BIN)/python benchmarks/ingest.py

# The prepared GPU check (README "GPU check"): make gpu-check OUT=dir [MODE=auto|full|tiny]
# [PARTS=ray_train,step] (a subset, in the check's order; default all).
# On the GPU machine (no .venv, no Ray) it unpacks .devbundle/, which
# ../shared/tools/device-bundle.sh builds here; with a .venv it runs there (tiny without CUDA).
GPU_PY = $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
GPU_ENV = PYTHONPATH=/tmp/site:$(CURDIR) RAY_AUTH_MODE=disabled
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=dir [MODE=auto|full|tiny] [PARTS=a,b]" >&2; exit 2; }
	@$(GPU_ENV) $(GPU_PY) -c "import ray" 2>/dev/null || { test -f .devbundle/setup.sh || \
	  { echo "no Ray here and no .devbundle/: run bash ../shared/tools/device-bundle.sh" >&2; \
	    exit 2; }; bash .devbundle/setup.sh; }
	$(GPU_ENV) $(GPU_PY) -m benchmarks.gpu_check --out $(OUT) --mode $(or $(MODE),auto) \
	  $(if $(PARTS),--parts $(PARTS))

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
