# Everything a fresh machine with python3 and make needs: `make run`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.dev-installed
DATA_DIR ?= ./engram-data
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install dev run test test-slow lint bench bench-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEVSTAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

dev: $(DEVSTAMP)

run: install
	$(BIN)/engram serve --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)

test: dev
	$(BIN)/python -m pytest -q

test-slow: dev
	$(BIN)/python -m pytest -q -m slow

lint: dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src
	$(BIN)/lint-imports --no-cache

bench: install
	$(BIN)/python bench/run_all.py

# The peers bench/bench_peers.py compares engram with (Debian packages), and the AWS CLI
# bench/bench_s3.py compares push and pull with (from PyPI, in a venv of its own: it pins its
# own botocore); `make bench` runs without them and prints their goals as SKIPPED.
bench-deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	set -x; $$SUDO apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y restic borgbackup zstd
	$(PY) -m venv $(VENV)/awscli && $(VENV)/awscli/bin/python -m pip install -q awscli

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
