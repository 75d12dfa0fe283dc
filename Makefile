# Two commands on a fresh machine:  make repro  /  make test
VENV    ?= .venv
PYTHON  ?= python3
BIN      = $(VENV)/bin
# torch first and pinned: pip then takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH    = torch==2.13.0
export DVC_NO_ANALYTICS = 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup setup-dev setup-browser repro test lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -c constraints.txt
	$(BIN)/pip install -q -e . -c constraints.txt
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]' -c constraints.txt
	touch $@

setup: $(BIN)/.installed
setup-dev: $(BIN)/.installed-dev

# The review-report test drives Debian's Chromium (Playwright's own browser download is offline-hostile).
setup-browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)

repro: setup
	$(BIN)/dvc config --local core.analytics false
	$(BIN)/dvc config --local core.check_update false
	$(BIN)/dvc repro

test: setup-dev setup-browser
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/python -m pytest -n 2

lint: setup-dev
	$(BIN)/ruff check pipeline tests benchmarks

bench: setup-dev
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf data .cache mlruns mlflow.db
