"""Pause and resume at checkpoints; the paused state is visible."""

import time
import uuid

import pytest
from celery import states

from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import RunState
from tests import tasks
from tests.conftest import wait_for, wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def run_state(result) -> str | None:
    """The run's recorded state (None until the worker's first batched write)."""
    return TaskRun.objects.filter(task_id=result.id).values_list("state", flat=True).first()


def progress(result) -> float | None:
    return (
        TaskRun.objects.filter(task_id=result.id).values_list("progress_current", flat=True).first()
    )


def test_paused_task_is_recorded_as_paused(worker):
    result = tasks.count_with_checkpoints.delay(steps=2000)
    wait_until_running(result)
    pause = wait_until_completed(CeleryTaskSignal.objects.pause(result.id))
    assert pause.outcome == "paused", f"expected paused, got {pause.outcome}"
    wait_for(lambda: run_state(result) == "paused", 5, "run record to show paused")
    CeleryTaskSignal.objects.cancel(result.id)


def test_paused_task_makes_no_progress(worker):
    result = tasks.count_with_checkpoints.delay(steps=2000)
    wait_until_running(result)
    wait_until_completed(CeleryTaskSignal.objects.pause(result.id))
    wait_for(lambda: run_state(result) == "paused", 5, "run record to show paused")
    before = progress(result)
    time.sleep(1)
    after = progress(result)
    assert before == after, f"progress moved from {before} to {after} while paused"
    CeleryTaskSignal.objects.cancel(result.id)


def test_resumed_task_carries_on_and_succeeds(worker):
    result = tasks.count_with_checkpoints.delay(steps=100)
    wait_until_running(result)
    wait_until_completed(CeleryTaskSignal.objects.pause(result.id))
    time.sleep(0.5)
    resume = wait_until_completed(CeleryTaskSignal.objects.resume(result.id))
    assert resume.outcome == "resumed", f"expected resumed, got {resume.outcome}"
    assert result.get(timeout=20)["steps"] == 100


def test_cancel_while_paused_stops_the_task(worker):
    result = tasks.count_with_checkpoints.delay(steps=2000)
    wait_until_running(result)
    wait_until_completed(CeleryTaskSignal.objects.pause(result.id))
    cancel = wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    assert cancel.outcome == "cooperative", f"expected cooperative, got {cancel.outcome}"
    wait_for(lambda: result.state == states.REVOKED, 10, "REVOKED")


def test_resume_of_a_task_that_is_not_paused_says_so(worker):
    result = tasks.count_with_checkpoints.delay(steps=2000)
    wait_until_running(result)
    resume = wait_until_completed(CeleryTaskSignal.objects.resume(result.id))
    assert resume.outcome == "not_paused", f"expected not_paused, got {resume.outcome}"
    CeleryTaskSignal.objects.cancel(result.id)


def test_custom_signal_kind_reaches_its_handler_inside_the_task(worker):
    result = tasks.count_with_checkpoints.delay(steps=150)
    wait_until_running(result)
    signal = CeleryTaskSignal.objects.send(result.id, "append_message", message="hello")
    assert wait_until_completed(signal).outcome == "handled"
    assert result.get(timeout=20)["messages"] == ["hello"], "the handler's effect was lost"


def test_visibility_timeout_outlasts_the_hard_time_limit(settings):
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert visibility > settings.CELERY_TASK_TIME_LIMIT, (
        "a run (paused or not) could outlive the visibility timeout and be redelivered"
    )


def test_a_pause_sent_before_the_task_started_pauses_it_at_its_first_checkpoint(worker):
    task_id = str(uuid.uuid4())
    CeleryTaskSignal.objects.pause(task_id)  # as for a task still queued
    result = tasks.count_with_checkpoints.apply_async(kwargs={"steps": 2000}, task_id=task_id)
    wait_for(lambda: run_state(result) == RunState.PAUSED, 10, "the task to start paused")
    assert progress(result) in (None, 0, 1), f"it ran on while paused: {progress(result)}"
    CeleryTaskSignal.objects.cancel(result.id)
