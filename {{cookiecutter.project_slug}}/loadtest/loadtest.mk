# The cancel storm (docs/loadtest.md). Included by the Makefile; it also works alone:
#   make -f loadtest/loadtest.mk loadtest
#
#   make loadtest                        web + worker from the Procfile, the tasksignal storm,
#                                        then the same storm with revoke(terminate=True) as a
#                                        baseline; everything stopped; summary printed
#   make loadtest LOADTEST_DURATION=30s LOADTEST_MODES=cancel
#
# Needs PostgreSQL and Redis (DATABASE_URL and REDIS_URL from the environment or .env) and the
# dev extras (locust): pip install -e '.[dev]'. Reports: $(LOADTEST_REPORT_DIR)/summary.json,
# storm.html, baseline.html, logs/. Exits with the storm's status; the baseline never fails it.

# The project's virtualenv when there is one, else whatever python3 is first on PATH (CI).
LOADTEST_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# Run time of each mode (locust's --run-time syntax: 90s, 2m, 1m30s).
LOADTEST_DURATION ?= 60s
# Storm users, each with one task in flight at a time; sibling users never cancel theirs.
LOADTEST_USERS ?= 64
LOADTEST_SIBLING_USERS ?= 8
# cancel (tasksignal), revoke (Celery's revoke(terminate=True, signal=SIGKILL)), or both.
LOADTEST_MODES ?= cancel,revoke
# Prefork processes of the worker: the storm's tasks sleep, so CPUs are not the limit;
# PostgreSQL connections are (about three per process; docs/loadtest.md).
LOADTEST_WORKER_CONCURRENCY ?= 24
# gunicorn processes and threads per process (one database connection per thread).
LOADTEST_WEB_CONCURRENCY ?= 3
LOADTEST_GUNICORN_THREADS ?= 4
# Locust processes (--processes); 1 runs Locust in a single process.
LOADTEST_PROCESSES ?= 1
# Gate: the p99 of cooperative cancels, in milliseconds.
LOADTEST_MAX_P99_MS ?= 100
LOADTEST_REPORT_DIR ?= loadtest/reports

.PHONY: loadtest

loadtest: ## Cancel storm, then the revoke baseline, against a local web + worker (docs/loadtest.md)
	LOADTEST_DURATION='$(LOADTEST_DURATION)' \
	LOADTEST_USERS='$(LOADTEST_USERS)' \
	LOADTEST_SIBLING_USERS='$(LOADTEST_SIBLING_USERS)' \
	LOADTEST_MODES='$(LOADTEST_MODES)' \
	LOADTEST_WORKER_CONCURRENCY='$(LOADTEST_WORKER_CONCURRENCY)' \
	LOADTEST_WEB_CONCURRENCY='$(LOADTEST_WEB_CONCURRENCY)' \
	LOADTEST_GUNICORN_THREADS='$(LOADTEST_GUNICORN_THREADS)' \
	LOADTEST_PROCESSES='$(LOADTEST_PROCESSES)' \
	LOADTEST_MAX_P99_MS='$(LOADTEST_MAX_P99_MS)' \
	LOADTEST_REPORT_DIR='$(LOADTEST_REPORT_DIR)' \
	$(LOADTEST_PYTHON) loadtest/run.py
