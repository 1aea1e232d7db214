"""A task runs on a real prefork worker subprocess and its result comes back."""

import pytest

from tests import tasks

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_task_runs_on_a_real_prefork_worker(worker):
    assert tasks.echo.delay({"answer": 42}).get(timeout=15) == {"answer": 42}


def test_worker_uses_several_processes(worker):
    assert len(worker.child_pids()) == worker.concurrency, "prefork children missing"
