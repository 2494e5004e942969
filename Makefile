# make demo: set up .venv; synthesise slides, pack them, train and evaluate a small model, screen new slides.
# make test: set up .venv with the test extras, then run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-out

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(BIN)/histoscreen synth $(DEMO)/slides --patients 6 --seed 0 --doubled
	$(BIN)/histoscreen prepare $(DEMO)/slides $(DEMO)/store
	$(BIN)/histoscreen train $(DEMO)/store --out $(DEMO)/model --epochs 4 --arch-kwargs '{"widths": [16, 32, 48]}' \
		--split-scheme kfold --folds 3 --fold 1
	$(BIN)/histoscreen evaluate $(DEMO)/store --model $(DEMO)/model --split val --split-scheme kfold --folds 3 --fold 1 \
		--out $(DEMO)/evaluation --bootstrap 200
	$(BIN)/histoscreen synth $(DEMO)/new-slides --patients 4 --seed 1 --first-index 100
	$(BIN)/histoscreen screen $(DEMO)/new-slides --out $(DEMO)/report --model $(DEMO)/model --um-per-px 1.0
	@echo "demo: SYNTHETIC slides (not real tissue). Model trained on 4 slides, evaluated on 2 held-out ones"
	@echo "      ($(DEMO)/evaluation/), then 4 new slides screened. Open the report:"
	@echo "      $(abspath $(DEMO))/report/index.html"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO) .cache .pytest_cache
