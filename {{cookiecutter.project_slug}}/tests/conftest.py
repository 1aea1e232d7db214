"""Fixtures: a real prefork Celery worker on the test database, and polling helpers.

Tests that use the worker need committed data (``transactional_db``): the worker is
another process and cannot see a test's open transaction.
"""

import time
import uuid
from collections.abc import Callable

import pytest
from django.conf import settings
from django.db import connection

import tests.tasks  # noqa: F401 - registers the test-only signal kind in this process too
from tasksignal.models import CeleryTaskSignal
from tasksignal.testing import WorkerProcess, running_pid


def database_url() -> str:
    """The URL of the test database pytest-django created."""
    db = connection.settings_dict
    user = db["USER"] or ""
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    return f"postgres://{user}{password}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"


def start_worker(tmp_path_factory, **kwargs) -> WorkerProcess:
    """Start a worker on the test database that also runs ``tests.tasks``."""
    env = {"DATABASE_URL": database_url(), **kwargs.pop("env", {})}
    log_dir = tmp_path_factory.mktemp("worker")
    return WorkerProcess(
        env=env,
        extra_args=("--include", "tests.tasks", *kwargs.pop("extra_args", ())),
        log_path=log_dir / "worker.log",
        **kwargs,
    ).start()


@pytest.fixture(scope="session")
def worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """A prefork worker with four processes, shared by the tests of a session."""
    with django_db_blocker.unblock():
        process = start_worker(tmp_path_factory, concurrency=4)
    yield process
    process.stop()


@pytest.fixture
def make_worker(transactional_db, tmp_path_factory):
    """Start extra workers for one test; all are stopped afterwards, even if the test fails."""
    started: list[WorkerProcess] = []

    def make(own_queue: bool = True, **kwargs) -> WorkerProcess:
        # Its own queue, so the session's shared worker cannot take this test's tasks.
        if own_queue:
            kwargs.setdefault(
                "queue", f"{settings.CELERY_TASK_DEFAULT_QUEUE}-{uuid.uuid4().hex[:6]}"
            )
        # start() cleans up after itself when it fails, so only started workers are kept.
        started.append(start_worker(tmp_path_factory, **kwargs))
        return started[-1]

    yield make
    for process in started:
        process.stop()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail saying ``what`` never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"after {timeout}s still waiting for: {what}")


def wait_until_completed(signal: CeleryTaskSignal, timeout: float = 15.0) -> CeleryTaskSignal:
    """Wait for ``signal`` to be completed by the worker; return it refreshed."""

    def completed():
        signal.refresh_from_db()
        return signal.completed

    wait_for(completed, timeout, f"{signal.signal} of {signal.task_id} to be completed")
    return signal


def wait_until_running(result, timeout: float = 15.0) -> int:
    """Wait until some worker process runs ``result``'s task, as its mailbox says; return
    that process's pid (works even for a task stuck in C code holding the GIL)."""
    return wait_for(lambda: running_pid(result.id), timeout, f"task {result.id} to start running")


def cancel_running(result) -> CeleryTaskSignal:
    """Cancel ``result``'s task once it runs; return the signal once the worker completed it."""
    wait_until_running(result)
    return wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
