"""What a cancel cleans up: callbacks, transactions, subprocesses, connections."""

import time

import psutil
import pytest
from django.contrib.auth.models import User

from tasksignal.models import CeleryTaskSignal
from tests import tasks
from tests.conftest import cancel_running, wait_for, wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_on_cancel_and_cleanups_run_exactly_once_last_registered_first(worker, tmp_path):
    log = tmp_path / "cleanups.log"
    result = tasks.record_cleanups.delay(str(log))
    cancel_running(result)
    lines = wait_for(lambda: log.exists() and log.read_text().splitlines(), 5, "cleanups to run")
    time.sleep(tasks.CANCEL_GRACE * 3)  # a repeated interrupt must not run them again
    lines = log.read_text().splitlines()
    assert lines == ["on_cancel", "second registered", "first registered"], (
        f"cleanups ran as {lines}"
    )


def test_cancel_rolls_back_the_tasks_open_transaction(worker):
    result = tasks.create_users_in_transaction.delay("rollback-", 500)
    wait_until_running(result)
    time.sleep(0.3)  # let it insert some rows
    wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    left = User.objects.filter(username__startswith="rollback-").count()
    assert left == 0, f"{left} rows written by the cancelled task survived"


def test_cancel_terminates_subprocesses_the_task_started(worker, tmp_path):
    pid_file = tmp_path / "child.pid"
    result = tasks.start_subprocess.delay(str(pid_file))
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10, "subprocess pid"))
    signal = wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    assert signal.outcome == "interrupted", f"expected interrupted, got {signal.outcome}"

    wait_for(lambda: _gone(pid), 5, f"subprocess {pid} of the cancelled task to exit")


def test_subprocesses_of_a_killed_task_are_killed_with_it(worker, tmp_path):
    pid_file = tmp_path / "child.pid"
    result = tasks.start_subprocess_then_hold_the_gil.delay(str(pid_file))
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10, "subprocess pid"))
    signal = wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    assert signal.outcome == "killed", f"expected killed, got {signal.outcome}"
    wait_for(lambda: _gone(pid), 5, f"subprocess {pid} of the killed task to die")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_interrupt_mid_query_leaves_the_process_a_working_connection(make_worker):
    with make_worker(concurrency=1) as single:
        result = tasks.query_postgres_sleep.apply_async(queue=single.queue)
        signal = cancel_running(result)
        assert signal.outcome == "interrupted", f"expected interrupted, got {signal.outcome}"
        # Same (only) process: its next database task must work.
        answer = tasks.count_users.apply_async(("nobody-",), queue=single.queue).get(timeout=15)
        assert answer == 0
        assert single.process.poll() is None, "the worker died"
