# geo-locate-ml: every target calls the `geolocate` CLI inside a local venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
GEO := HF_HUB_OFFLINE=1 $(BIN)/geolocate
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
MAPILLARY_CONFIG ?= configs/mapillary.yaml
BATCH ?= 01

.PHONY: setup demo test bench download rebuild train export batch loop clean-raw aggregate clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(GEO) demo --config $(CONFIG)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

download: setup
	$(GEO) download --config $(MAPILLARY_CONFIG) $(ARGS)

rebuild: setup
	$(GEO) index --config $(CONFIG)
	$(GEO) split --config $(CONFIG)

train: setup
	$(GEO) train --config $(CONFIG)

export: setup
	$(GEO) export

aggregate: setup
	$(GEO) runs aggregate

batch: setup
	$(GEO) batch cities/batch_$(BATCH).csv --config $(MAPILLARY_CONFIG)

loop: setup
	for f in cities/batch_*.csv; do $(GEO) batch $$f --config $(MAPILLARY_CONFIG) || exit 1; done

clean-raw: setup
	$(GEO) clean-raw --config $(MAPILLARY_CONFIG) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
