# StreamRec — the two commands: `make demo` and `make test`.
# Both create .venv when absent and install the pinned dependencies (constraints.txt) once;
# re-running is a no-op unless pyproject.toml or constraints.txt changed.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= .streamrec/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean soak

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(DEMO_DIR)

# Each tier in its own process: every tier starts its own Ray, so deployments left by one tier
# never hold the CPUs another tier's Ray Train or Serve needs. tests/faults: real faults under load.
test: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)
	$(PY) -m pytest tests/faults $(PYTEST_ARGS)

# Soak: fixed-rate open-loop load on the fused composition (recommends + events), reported per
# minute with each replica's RSS (bench/soak.py). make soak SOAK_MINUTES=2 SOAK_RPS=20 SOAK_ARGS='--data-dir D'
soak: $(STAMP)
	$(PY) bench/soak.py --minutes $(or $(SOAK_MINUTES),10) --rps $(or $(SOAK_RPS),20) $(SOAK_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check streamrec deployments training tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .streamrec .mypy_cache .ruff_cache .pytest_cache
