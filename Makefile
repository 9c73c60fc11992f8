# The README's commands. Each installs what it needs first, so a fresh clone needs only
# Python 3.11 (and, for the Docker runtime, a Docker engine).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: up test install install-test image images lint bench bench-pipelines clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: a start reinstalls only when pyproject.toml changed since the last install.
$(VENV)/.installed-server: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server,test]'
	touch $@ $(VENV)/.installed-server

## The server and the client (`pip install .` alone is the client: CLI and SDK).
install: $(VENV)/.installed-server

## The browser tests drive Debian's Chromium (Playwright's own browser download is not used);
## without it, and without root to install it, they are skipped with the reason.
install-test: $(VENV)/.installed-test
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: the console tests will be skipped"; \
	fi

## Run Ferry on embedded PostgreSQL and Redis (Ctrl-C stops it).
## The runner image is built first where it can be (a failed build is not fatal: `ferry up`
## then runs replicas in the process runtime and says so).
up: install
	-@$(MAKE) --no-print-directory image
	$(BIN)/ferry up

## Build the default runner image offline, if a Docker engine answers and it is missing.
image: install
	@if docker info >/dev/null 2>&1; then \
	  if ! command -v debootstrap >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null) || true; \
	  fi; \
	  $(BIN)/ferry image build; \
	else echo "no Docker engine: the Docker tests will be skipped"; fi

## Every image deploy/compose.yaml runs (runner, Ferry, PostgreSQL, Redis, proxy), built
## offline and cached by content; without a Docker engine or root it says so and goes on
## (the cluster tests then skip with the reason).
images: install
	@if docker info >/dev/null 2>&1; then \
	  if ! command -v debootstrap >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null) || true; \
	  fi; \
	  $(BIN)/ferry image build --all || echo "the deployment images could not be built: the cluster tests will be skipped"; \
	else echo "no Docker engine: the Docker tests will be skipped"; fi

## Run the whole test suite against real PostgreSQL, Redis and Docker, with a coverage
## summary of this process (workers and schedulers run as subprocesses are not counted).
COVERAGE = --cov=core --cov=service --cov=worker --cov=scheduler --cov=ferry --cov-report=term

test: install-test image images
	$(BIN)/python -m pytest $(COVERAGE)

lint: install-test
	$(BIN)/ruff check core service worker scheduler ferry tests bench
	$(BIN)/mypy

bench: install-test image
	$(BIN)/python -m bench

## The pipeline benchmark, beside a hand-chained client and Celery (installed for it only).
bench-pipelines: install-test
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.pipelines

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .coverage
