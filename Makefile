# criud: `make run` sets up and starts the daemon on its defaults;
# `make test` sets up and runs ruff, mypy --strict and the whole test suite.
# Both need root (criu does).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
MYPY_TREE = build/mypy-src

.PHONY: run test test-deps criu venv lint typecheck unit integration bench bench-quick soak clean

run: criu venv
	$(VENV)/bin/criud serve

test: criu test-deps venv lint typecheck
	$(PY) -m pytest -q tests

test-deps:
	bash deploy/install-test-deps

criu:
	bash deploy/install-criu

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "make: $(PYTHON) lacks venv/ensurepip; installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The packages live in top-level folders mapped to criud.* at install time;
# mypy cannot follow setuptools' editable finder, so it reads a symlink tree
# with the installed layout.
typecheck: venv
	@mkdir -p $(MYPY_TREE)/criud
	@for p in daemon api dump restore; do ln -sfn ../../../$$p $(MYPY_TREE)/criud/$$p; done
	cd $(MYPY_TREE) && MYPYPATH=. ../../$(VENV)/bin/mypy --strict --config-file ../../pyproject.toml -p criud

unit: venv
	$(PY) -m pytest -q tests/unit

integration: criu venv
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf build $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Benchmarks: criud against raw criu, one run (root, real criu; see
# docs/benchmarks.md). `bench` rewrites docs/benchmarks.md and .png;
# `bench-quick` (< 2 minutes) only prints and writes bench/results/.
BENCH_STAMP = $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: criu $(BENCH_STAMP)
	$(PY) bench/bench.py

bench-quick: criu $(BENCH_STAMP)
	$(PY) bench/bench.py --quick

# Soak: 200 checkpoint/restore cycles, 8 clients at once; prints the daemon's
# fd count and RSS before and after (`make test` runs a 16-cycle form).
soak: criu venv
	CRIUD_SOAK_CYCLES=200 $(PY) -m pytest -q -s tests/integration/test_soak.py
