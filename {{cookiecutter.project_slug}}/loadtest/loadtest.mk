# The cancel storm (docs/loadtest.md). Included by the Makefile; it also works alone:
#   make -f loadtest/loadtest.mk loadtest
#
#   make loadtest                        web + worker from the Procfile, the tasksignal storm,
#                                        then the same storm with revoke(terminate=True) as a
#                                        baseline; everything stopped; summary printed
#   make loadtest LOADTEST_DURATION=30s LOADTEST_MODES=cancel
#   make loadtest LOADTEST_MODES=peak    ramp the users until stops/s stop growing, then the
#                                        baseline at the peak's users
#
# Needs PostgreSQL and Redis (DATABASE_URL and REDIS_URL from the environment or .env) and the
# dev extras (locust): pip install -e '.[dev]'. Reports: $(LOADTEST_REPORT_DIR)/summary.json,
# storm.html, baseline.html, logs/. Exits with the storm's status; the baseline never fails it.

# The project's virtualenv when there is one, else whatever python3 is first on PATH (CI).
LOADTEST_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# Run time of each mode (locust's --run-time syntax: 90s, 2m, 1m30s).
LOADTEST_DURATION ?= 60s
# Storm users, each with one task in flight at a time; sibling users never cancel theirs.
# 32 + 8 tasks in flight for 64 worker processes: every cancel hits a running task, and the
# cooperative p99 gate holds on an idle 2-CPU machine (peak mode finds the throughput).
LOADTEST_USERS ?= 32
LOADTEST_SIBLING_USERS ?= 8
# cancel (tasksignal), revoke (Celery's revoke(terminate=True, signal=SIGKILL)), and/or peak
# (storms with LOADTEST_PEAK_USERS users, LOADTEST_PEAK_STEP each, until stops/s stop growing).
LOADTEST_MODES ?= cancel,revoke
LOADTEST_PEAK_USERS ?= 64,96,128,160
LOADTEST_PEAK_STEP ?= 20s
# Prefork processes of the worker: the storm's tasks sleep, so CPUs are not the limit, and
# the worker node holds one PostgreSQL connection whatever the number (docs/loadtest.md).
LOADTEST_WORKER_CONCURRENCY ?= 64
# gunicorn processes (threads: GUNICORN_THREADS, 150 by default; waiters hold none of the
# database pool's connections).
LOADTEST_WEB_CONCURRENCY ?= 2
# Gate: the p99 of cooperative cancels, in milliseconds.
LOADTEST_MAX_P99_MS ?= 100
LOADTEST_REPORT_DIR ?= loadtest/reports

.PHONY: loadtest chaos

# The storm while its servers fail (loadtest/faults.py): servers of its own, every fault once.
CHAOS_DURATION ?= 90s

chaos: ## Cancel storm while the worker node, Redis and PostgreSQL fail (docs/loadtest.md)
	CHAOS_DURATION='$(CHAOS_DURATION)' LOADTEST_REPORT_DIR='$(LOADTEST_REPORT_DIR)' \
	$(LOADTEST_PYTHON) loadtest/faults.py

loadtest: ## Cancel storm, then the revoke baseline, against a local web + worker (docs/loadtest.md)
	LOADTEST_DURATION='$(LOADTEST_DURATION)' \
	LOADTEST_USERS='$(LOADTEST_USERS)' \
	LOADTEST_SIBLING_USERS='$(LOADTEST_SIBLING_USERS)' \
	LOADTEST_MODES='$(LOADTEST_MODES)' \
	LOADTEST_PEAK_USERS='$(LOADTEST_PEAK_USERS)' \
	LOADTEST_PEAK_STEP='$(LOADTEST_PEAK_STEP)' \
	LOADTEST_WORKER_CONCURRENCY='$(LOADTEST_WORKER_CONCURRENCY)' \
	LOADTEST_WEB_CONCURRENCY='$(LOADTEST_WEB_CONCURRENCY)' \
	LOADTEST_MAX_P99_MS='$(LOADTEST_MAX_P99_MS)' \
	LOADTEST_REPORT_DIR='$(LOADTEST_REPORT_DIR)' \
	$(LOADTEST_PYTHON) loadtest/run.py
