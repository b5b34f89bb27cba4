# The whole set-up on a fresh machine is `make demo` or `make test`.
# Each creates .venv when missing and (re)installs the project only when pyproject.toml
# changed since the last install. Numba's on-disk cache lives in build/ (git-ignored).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NUMBA_CACHE_DIR := $(CURDIR)/build/numba-cache
export PYTHONDONTWRITEBYTECODE := 1

# pytest options: both cores, per-test timeout. `make test-quick` skips the slow tests.
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo test test-quick test-long lint bench clean install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/balloonlab demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not long"

# ruff (rules chosen in pyproject.toml) and mypy: strict on protocol/, checked elsewhere.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy protocol hypervisor guest balloonlab benchmarks

test-quick: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow and not long"

# The exhaustive fault matrices (about 15 minutes more on 2 cores).
test-long: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m long

# Every benchmark in its full variant, results into docs/results (the tables in
# docs/results.md come from them, so these stay comparable). About 55 minutes; a plain
# `balloonlab bench NAME` is the quick run of a minute or two.
bench: $(STAMP)
	$(VENV)/bin/balloonlab bench protocol --repeat 9 --breakdown --out docs/results
	$(VENV)/bin/balloonlab bench reclaim --full --out docs/results
	$(VENV)/bin/balloonlab bench kernels --full --out docs/results
	$(VENV)/bin/balloonlab bench scale --full --out docs/results
	$(VENV)/bin/balloonlab bench concurrent --vms 8 --vm-size 128MiB --repeat 3 --out docs/results
	$(VENV)/bin/balloonlab bench fidelity --full --out docs/results

clean:
	rm -rf build $(VENV) *.egg-info
