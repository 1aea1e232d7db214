# The template's own tasks. `make test` is what CI runs (.ci/run).
#   make test        service check (and Chromium), then every template test (bakes, hooks, e2e)
#   make test-fast   the same without the end-to-end tests (no project installs, ~1 min)
#   make test-compose  only the compose test: the default bake's stack on a real Docker engine
#   make docker-engine install the engine and plugins, build the base images, stop (warms caches)
#   make docker-engine-clean  remove the engine's cache and data root (images, volumes)
#   make demo        bake the default project, run web + worker natively, cancel a job of each
#                    shape: the ladder in one table (and revoke(terminate=True) for contrast)
#   make lint        ruff on the hooks, tests and scripts
#   make lock        remake the lock files of every option set (scripts/lock.py; needs PyPI)
#   make clean       remove .venv, .demo and caches
# Variables: PYTHON (interpreter for .venv), PYTEST_ARGS (extra pytest arguments),
# DATABASE_URL and REDIS_URL (servers to test against; defaults in scripts/baked.py),
# TASKSIGNAL_DOCKER_HOST (use that engine, e.g. unix:///var/run/docker.sock, not our own),
# TASKSIGNAL_DOCKER_CACHE (where our engine keeps its data; ~/.cache/tasksignal-template/docker),
# TASKSIGNAL_CHROMIUM (the browser the baked project's admin tests drive; /usr/bin/chromium).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest's default temp folders rotate (it keeps the last three per user), so another pytest
# run on the same machine could delete a running suite's bakes; keep ours in the checkout.
BASETEMP := $(CURDIR)/.pytest-tmp
PYTEST := $(BIN)/python -m pytest --basetemp=$(BASETEMP)
# The baked project's browser tests drive Debian's Chromium (never Playwright's download).
export TASKSIGNAL_CHROMIUM ?= /usr/bin/chromium

.PHONY: help test test-fast test-compose docker-engine docker-engine-clean lint format demo \
	services browser clean lock

help:
	@sed -n '2,15p' Makefile | sed 's/^# \{0,1\}//'

$(STAMP): tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'uv>=0.9,<1'
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r tests/requirements.txt
	touch $@

services: $(STAMP) browser
	$(BIN)/python scripts/check_services.py

# Idempotent: nothing to do when the browser is there; as root on Debian, install it (the
# package lists are refreshed only when the first try cannot find it); otherwise say how.
browser:
	@if [ -x "$(TASKSIGNAL_CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the admin's browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium >/dev/null \
			|| { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	else \
		echo "no browser at $(TASKSIGNAL_CHROMIUM): the e2e tests will fail;" \
			"install Debian's chromium or set TASKSIGNAL_CHROMIUM" >&2; \
	fi

test: services
	$(PYTEST) tests/ $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST) tests/ -m 'not e2e' $(PYTEST_ARGS)

test-compose: services
	$(PYTEST) tests/test_compose.py $(PYTEST_ARGS)

docker-engine: $(STAMP)
	$(BIN)/python scripts/docker_engine.py prepare

docker-engine-clean: $(STAMP)
	$(BIN)/python scripts/docker_engine.py stop
	rm -rf "$${TASKSIGNAL_DOCKER_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/tasksignal-template/docker}"

lint: $(STAMP)
	$(BIN)/ruff check hooks tests scripts
	$(BIN)/ruff format --check hooks tests scripts

format: $(STAMP)
	$(BIN)/ruff check --fix hooks tests scripts
	$(BIN)/ruff format hooks tests scripts

lock: $(STAMP)
	$(BIN)/python scripts/lock.py

demo: services
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .demo .pytest-tmp .pytest_cache .ruff_cache
	find hooks tests scripts -name __pycache__ -type d -prune -exec rm -rf {} +
