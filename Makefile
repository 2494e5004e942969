# make demo: set up .venv, then run the main job on synthetic slides.
# make test: set up .venv with the test extras, then run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-out

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(BIN)/histoscreen synth $(DEMO)/slides --patients 6 --seed 0 --doubled
	$(BIN)/histoscreen prepare $(DEMO)/slides $(DEMO)/store
	$(BIN)/histoscreen splits $(DEMO)/store --scheme kfold --folds 3
	@echo "demo store: $(DEMO)/store (SYNTHETIC slides, not real tissue)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO) .cache .pytest_cache
