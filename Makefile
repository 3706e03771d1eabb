# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip takes torch from the local wheel cache where one is configured, from PyPI otherwise.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/dscl demo

test: $(VENV)/.installed
	$(PY) -m pytest -n auto -rs tests   # one worker process per core (pytest-xdist); -rs: say why a test skipped

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks   # rules in pyproject.toml [tool.ruff]

clean:
	rm -rf $(VENV) runs .pytest_cache
