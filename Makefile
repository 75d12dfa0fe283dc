# Two commands on a fresh machine:  make repro  /  make test
VENV    ?= .venv
PYTHON  ?= python3
BIN      = $(VENV)/bin
# torch first and pinned: pip then takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH    = torch==2.13.0
PACS_PORT ?= 8042
MLFLOW_PORT ?= 5000
export DVC_NO_ANALYTICS = 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup setup-dev setup-browser setup-pacs setup-postgres pacs pacs-stop mlflow-server mlflow-server-stop \
	repro test lint bench clean

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

# A real PACS for development and the DICOMweb tests: Debian's Orthanc with its DICOMweb plugin, and
# dicom3tools (dciodvfy). The package's postinst may start a system Orthanc service (/etc/orthanc, port 8042;
# in a container policy-rc.d denies it): ours runs with its own configuration, the tests on free ports,
# and `make pacs` says if port $(PACS_PORT) is taken (then stop that service or pass PACS_PORT=...).
setup-pacs:
	(command -v Orthanc || test -x /usr/sbin/Orthanc) >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
		&& command -v dciodvfy >/dev/null \
		|| (apt-get update -q && apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb dicom3tools)

# Web UI http://127.0.0.1:$(PACS_PORT)/app/explorer.html, DICOMweb http://127.0.0.1:$(PACS_PORT)/dicom-web;
# state (storage, log, PID) in .pacs/.
pacs: setup setup-pacs
	$(BIN)/python -m tools.orthanc start --port $(PACS_PORT)

pacs-stop:
	$(BIN)/python -m tools.orthanc stop

# The shared MLflow tracking server's database: Debian's PostgreSQL (its server programs live in
# /usr/lib/postgresql/N/bin, off PATH). The package's postinst may start a system cluster on port 5432
# (in a container policy-rc.d denies it); ours is a separate cluster in .mlflow-server/ on a free port.
setup-postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| (apt-get update -q && apt-get install -y -q --no-install-recommends postgresql)

# A shared tracking server: PostgreSQL backend, proxied artifacts, both on 127.0.0.1 (state in .mlflow-server/).
# Pipelines use it with mlflow.tracking_uri: http://127.0.0.1:$(MLFLOW_PORT).
mlflow-server: setup setup-postgres
	$(BIN)/python -c 'import psycopg' 2>/dev/null || $(BIN)/pip install -q -e '.[postgres]' -c constraints.txt
	$(BIN)/python -m tools.mlflow_server start --port $(MLFLOW_PORT)

mlflow-server-stop:
	$(BIN)/python -m tools.mlflow_server stop

repro: setup
	$(BIN)/dvc config --local core.analytics false
	$(BIN)/dvc config --local core.check_update false
	$(BIN)/dvc repro

test: setup-dev setup-browser setup-pacs setup-postgres
	$(BIN)/ruff check pipeline tests benchmarks tools
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: setup-dev
	$(BIN)/ruff check pipeline tests benchmarks tools

bench: setup-dev
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf data .cache mlruns mlflow.db
