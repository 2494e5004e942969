# make demo: set up .venv; screen three real val slides with the shipped model; HTML report.
# make demo-train: synthetic slides -> store -> train -> evaluate -> screen new slides.
# make test: set up .venv with the test extras, then run the whole test suite and build the docs (strict).
# make docs: build the documentation site (docs/, mkdocs.yml) into site/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-out

.PHONY: demo demo-train test docs install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[wsi,serve]'
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test,wsi,serve,distributed,docs]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO)/slides $(DEMO)/report
	$(BIN)/histoscreen demo-slides $(DEMO)/slides
	$(BIN)/histoscreen screen $(DEMO)/slides --out $(DEMO)/report
	@echo "demo: three REAL slides of official val patients (8917, 8956, 16896) screened with the shipped model."
	@echo "      These patients helped choose the model's threshold and slide context: this shows the product,"
	@echo "      not its accuracy (see the README). Open the report:"
	@echo "      $(abspath $(DEMO))/report/index.html"

demo-train: $(VENV)/.installed
	rm -rf $(DEMO)/synthetic
	$(BIN)/histoscreen synth $(DEMO)/synthetic/slides --patients 6 --seed 0 --doubled
	$(BIN)/histoscreen prepare $(DEMO)/synthetic/slides $(DEMO)/synthetic/store
	$(BIN)/histoscreen train $(DEMO)/synthetic/store --out $(DEMO)/synthetic/model --epochs 4 --arch-kwargs '{"widths": [16, 32, 48]}' \
		--split-scheme kfold --folds 3 --fold 1
	$(BIN)/histoscreen evaluate $(DEMO)/synthetic/store --model $(DEMO)/synthetic/model --split val --split-scheme kfold --folds 3 --fold 1 \
		--out $(DEMO)/synthetic/evaluation --bootstrap 200
	$(BIN)/histoscreen synth $(DEMO)/synthetic/new-slides --patients 4 --seed 1 --first-index 100
	$(BIN)/histoscreen screen $(DEMO)/synthetic/new-slides --out $(DEMO)/synthetic/report --model $(DEMO)/synthetic/model --mpp 1.0
	@echo "demo-train: SYNTHETIC slides (not real tissue). Model trained on 4 slides, evaluated on 2 held-out ones"
	@echo "      ($(DEMO)/synthetic/evaluation/), then 4 new slides screened. Open the report:"
	@echo "      $(abspath $(DEMO))/synthetic/report/index.html"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet --site-dir .cache/site

docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(DEMO) .cache .pytest_cache
