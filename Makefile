# The README's commands. Each installs what it needs first, so a fresh clone needs only
# Python 3.11 (and, for the Docker runtime, a Docker engine).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: up test install install-test image lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

## Run Ferry on embedded PostgreSQL and Redis (Ctrl-C stops it).
up: install
	$(BIN)/ferry up

## Build the default runner image offline, if a Docker engine answers and it is missing.
image: install
	@if docker info >/dev/null 2>&1; then \
	  if ! command -v debootstrap >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null) || true; \
	  fi; \
	  $(BIN)/ferry image build; \
	else echo "no Docker engine: the Docker tests will be skipped"; fi

## Run the whole test suite against real PostgreSQL, Redis and Docker.
test: install-test image
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check core service worker scheduler ferry tests bench
	$(BIN)/mypy

bench: install-test image
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
