# `make run` and `make test` set everything up on a fresh machine (Python venv, buf from npm).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# What `make run` needs: the service and its runtime dependencies only, not the tests' and bench's.
RUNTIME := $(VENV)/.installed-runtime
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# Database tests also run against this PostgreSQL (the machine's local server, trust auth).
export GALLERY_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
# The bench's listing also runs on a throw-away database of this server (bench/_postgres.py).
export GALLERY_BENCH_POSTGRES_URL ?= $(GALLERY_TEST_POSTGRES_URL)
# Most tests wait on subprocesses, sockets and disks more than they compute: three pytest workers
# keep 2 CPUs busy (2026-11-30, the same tree: 7:16 with two, 5:57 with three, 6:27 with four;
# tests/conftest.py: which tests share a worker). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15  # the slowest: where the time goes

.PHONY: setup run test unit e2e lint generate check-generated bench bench-quick clean

setup: $(INSTALLED)

$(RUNTIME): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(INSTALLED): $(RUNTIME) pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

$(BUF):
	npm install --silent --no-save --no-package-lock --prefix .tools @bufbuild/buf@$(BUF_VERSION)

run: $(RUNTIME)
	$(VENV)/bin/gallery run

generate: setup
	$(PY) tools/generate.py

check-generated: setup
	$(PY) tools/generate.py --check

lint: setup $(BUF)
	$(VENV)/bin/ruff check server tests tools bench
	$(BUF) lint "generated/gallery_descriptor.pb#format=binpb" --path gallery/v1 --config buf.yaml

test: setup check-generated lint
	$(PYTEST)

unit: setup
	$(PYTEST) -m "not e2e"

e2e: setup
	$(PYTEST) -m e2e

# The full suite (< 15 min): rewrites BENCHMARKS.md and writes bench/results/<time>.json.
bench: setup
	$(PY) bench/run.py

# The same code paths on small sizes (< 1 min), correctness asserted; `make test` runs it too
# (tests/e2e/test_bench_quick.py).
bench-quick: setup
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) .tools data build .pytest_cache
