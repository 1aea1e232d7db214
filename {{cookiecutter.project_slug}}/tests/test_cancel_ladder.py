"""Each rung of the cancel ladder, on a real prefork worker."""

import uuid

import pytest
from celery import states

from tasksignal.models import CeleryTaskSignal
from tests import tasks
from tests.conftest import cancel_running, wait_for, wait_until_completed

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def assert_revoked(result) -> None:
    wait_for(lambda: result.state == states.REVOKED, 10, f"{result.id} to be REVOKED")


def test_cancel_sent_before_the_task_starts_skips_its_body(worker, tmp_path):
    marker = tmp_path / "started"
    # Unique: the result backend outlives test databases (a stale SUCCESS is never replaced).
    task_id = f"skip-{uuid.uuid4()}"
    CeleryTaskSignal.objects.cancel(task_id)
    result = tasks.mark_started.apply_async((str(marker),), task_id=task_id)
    signal = wait_until_completed(CeleryTaskSignal.objects.get(task_id=task_id))
    assert signal.outcome == "skipped", f"expected skipped, got {signal.outcome}"
    assert_revoked(result)
    assert not marker.exists(), "the body of a task cancelled before it started ran anyway"


def test_checkpoint_stops_a_task_cooperatively(worker):
    result = tasks.count_with_checkpoints.delay()
    signal = cancel_running(result)
    assert signal.outcome == "cooperative", f"expected cooperative, got {signal.outcome}"
    assert_revoked(result)


def test_cancelled_task_ends_revoked_not_failed(worker):
    result = tasks.count_with_checkpoints.delay()
    cancel_running(result)
    assert_revoked(result)
    assert result.state != states.FAILURE, "a cancelled task was recorded as a failure"


@pytest.mark.parametrize(
    "task",
    [tasks.sleep_without_checkpoints, tasks.wait_on_socket, tasks.busy_python_loop],
    ids=["asleep", "blocked-on-a-socket-read", "spinning-in-a-python-loop"],
)
def test_task_without_checkpoints_is_interrupted(worker, task):
    result = task.delay()
    signal = cancel_running(result)
    assert signal.outcome == "interrupted", f"expected interrupted, got {signal.outcome}"
    assert_revoked(result)


@pytest.mark.parametrize(
    "task",
    [tasks.hold_the_gil, tasks.swallow_interrupts],
    ids=["holding-the-gil-in-c-code", "swallowing-interrupts-with-bare-except"],
)
def test_task_that_cannot_be_interrupted_is_killed(worker, task):
    result = task.delay()
    signal = cancel_running(result)
    assert signal.outcome == "killed", f"expected killed, got {signal.outcome}"
    assert_revoked(result)


def test_worker_keeps_serving_after_a_kill(worker):
    result = tasks.hold_the_gil.delay()
    cancel_running(result)
    answers = [tasks.echo.delay(n).get(timeout=15) for n in range(6)]
    assert answers == list(range(6)), f"worker answered {answers} after a kill"


def test_kill_happens_after_kill_after_not_before(worker):
    result = tasks.hold_the_gil.delay()
    signal = cancel_running(result)
    took = (signal.completed_at - signal.created).total_seconds()
    assert took >= tasks.KILL_AFTER, f"killed after {took:.2f}s, before kill_after"


def test_cancel_of_a_finished_task_is_too_late(worker):
    result = tasks.echo.delay("done")
    assert result.get(timeout=15) == "done"
    signal = wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    assert signal.outcome == "too_late", f"expected too_late, got {signal.outcome}"
    assert result.state == states.SUCCESS, "a finished task's state changed after a late cancel"


def test_celery_soft_time_limit_still_fires_in_a_signal_aware_task(worker):
    result = tasks.exceed_soft_time_limit.delay()
    assert result.get(timeout=15) == "soft time limit", (
        "SoftTimeLimitExceeded did not reach the task"
    )
