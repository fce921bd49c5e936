# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install, run the main job on the built-in dataset
#   make test   create .venv if needed, run the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint bench-ingest browser clean

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

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
