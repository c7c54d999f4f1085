# The two commands: `make demo` and `make test`. Each creates .venv when missing and reinstalls only when
# pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO)
	$(PY) cli.py extract builtin:digits --model tf_efficientnet_lite0 --weights packaged --out $(DEMO)/digits-lite0.h5 --overwrite
	$(PY) cli.py inspect $(DEMO)/digits-lite0.h5

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
