"""Celery's own stop buttons go through tasksignal for signal-aware tasks (``control.py``):
``app.control.revoke``, ``revoke(terminate=True)`` and ``celery control revoke``."""

import random
import subprocess
import sys
import time

import pytest
from celery import current_app
from celery.result import AsyncResult

from tasksignal.control import REVOKE_MESSAGE, TERMINATE_MESSAGE, celery_revoke
from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import Outcome, RunState
from tasksignal.testing import PROJECT_DIR
from tests import tasks
from tests.conftest import wait_for, wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def cancel_of(task_id: str, timeout: float = 15.0) -> CeleryTaskSignal:
    """The cancel row a revoke wrote for ``task_id``, once a worker completed it."""
    row = wait_for(
        lambda: CeleryTaskSignal.objects.filter(task_id=task_id, signal=CANCEL_TASK).first(),
        timeout,
        f"a revoke of {task_id} to write its cancel row",
    )
    return wait_until_completed(row, timeout)


def shows_revoked(task_id: str, timeout: float = 5.0) -> bool:
    """Whether the result backend shows ``task_id`` REVOKED within ``timeout`` (a kill's
    outcome is written while the process is frozen, just before Celery stores REVOKED)."""
    deadline = time.monotonic() + timeout
    while AsyncResult(task_id).state != "REVOKED":
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def run_state(task_id: str, timeout: float = 10.0) -> str:
    """The run record's state once it is final (the node writes records in batches)."""
    return wait_for(
        lambda: (
            TaskRun.objects.filter(task_id=task_id, state__in=RunState.FINISHED)
            .values_list("state", flat=True)
            .first()
        ),
        timeout,
        f"the run record of {task_id} to end",
    )


def test_plain_revoke_stops_a_running_signal_aware_task(worker):
    result = tasks.sleep_without_checkpoints.delay(60)
    wait_until_running(result)
    current_app.control.revoke(result.id)
    signal = cancel_of(result.id)
    assert signal.outcome == Outcome.INTERRUPTED, (
        f"revoke() should stop a sleeping task by the ladder, the cancel says {signal.outcome}"
    )
    assert signal.message == REVOKE_MESSAGE, f"the row does not say it came from revoke(): {signal}"
    assert shows_revoked(result.id), f"the stopped task shows {result.state}, not REVOKED"
    assert run_state(result.id) == RunState.CANCELLED, "the run record does not say cancelled"


def test_revoke_terminate_kills_without_waiting_for_the_ladder(worker):
    result = tasks.hold_the_gil.delay()  # deaf to checkpoints and interrupts: only a kill
    wait_until_running(result)
    current_app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    signal = cancel_of(result.id)
    took = (signal.completed_at - signal.created).total_seconds()
    assert signal.outcome == Outcome.KILLED, f"terminate should kill, the cancel says {signal}"
    assert took < tasks.KILL_AFTER, f"terminate waited {took:.2f}s, as long as kill_after"
    assert signal.message == TERMINATE_MESSAGE, f"the row does not say terminate: {signal}"
    assert shows_revoked(result.id), f"the killed task shows {result.state}, not REVOKED"
    assert run_state(result.id) == RunState.CANCELLED, "the run record does not say cancelled"


def test_revoke_terminate_never_kills_the_next_task_of_the_same_process(make_worker):
    # The race Celery's docs warn about: the revoke lands as the process finishes the task
    # and takes the next one; Celery would signal the pid, killing the next task.
    single = make_worker(concurrency=1)
    rng = random.Random(12)
    victims, siblings = [], []
    for n in range(15):
        victims.append(tasks.echo.apply_async((f"victim {n}", 0.1), queue=single.queue))
        siblings.append(tasks.echo.apply_async((n, 0.1), queue=single.queue))
    for victim in victims:
        wait_until_running(victim)
        time.sleep(rng.uniform(0.05, 0.15))  # around its end
        current_app.control.revoke(victim.id, terminate=True, signal="SIGKILL")
    answers = [sibling.get(timeout=30) for sibling in siblings]
    assert answers == list(range(15)), "a revoke(terminate=True) harmed the next task"
    for victim in victims:
        signal = cancel_of(victim.id)
        assert signal.outcome in {*Outcome.STOPPED, Outcome.TOO_LATE}, (
            f"the revoke of {victim.id} was not recorded like a cancel: {signal.outcome!r}"
        )
        if signal.outcome in Outcome.STOPPED:
            assert shows_revoked(victim.id), f"{signal.outcome}, but not REVOKED"
            assert run_state(victim.id) == RunState.CANCELLED, f"{signal.outcome}, not cancelled"
        else:  # it ended first; a run that short may have no record at all
            assert AsyncResult(victim.id).get(timeout=5) == f"victim {victims.index(victim)}"


def test_revoke_heard_by_every_worker_writes_one_cancel_and_kills_once(make_worker):
    holder = make_worker(concurrency=1)
    make_worker(concurrency=1)  # does not hold the task, hears the broadcast all the same
    result = tasks.hold_the_gil.apply_async(queue=holder.queue)
    wait_until_running(result)
    current_app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    signal = cancel_of(result.id)
    assert signal.outcome == Outcome.KILLED, f"the holder did not kill it: {signal.outcome}"
    time.sleep(0.5)  # the other worker's write, had it made a second row
    rows = CeleryTaskSignal.objects.filter(task_id=result.id, signal=CANCEL_TASK).count()
    assert rows == 1, f"two workers hearing one revoke wrote {rows} cancel rows"


def test_revoke_of_a_queued_task_survives_a_worker_restart(make_worker, tmp_path):
    marker = tmp_path / "started"
    first = make_worker(concurrency=1)
    parked = f"{first.queue}-parked"  # no worker reads it yet: the task waits in the broker
    result = tasks.mark_started.apply_async((str(marker), 0.1), queue=parked)
    current_app.control.revoke(result.id)  # plain Celery would keep the id in memory only
    signal = wait_for(
        lambda: CeleryTaskSignal.objects.filter(task_id=result.id, signal=CANCEL_TASK).first(),
        10,
        "the revoke to write a cancel row",
    )
    first.stop()
    with make_worker(concurrency=1, queue=f"{first.queue},{parked}"):
        signal = wait_until_completed(signal)
    assert signal.outcome == Outcome.SKIPPED, f"expected skipped after restart: {signal.outcome}"
    assert not marker.exists(), "the revoked task ran after its worker restarted"
    assert shows_revoked(result.id), f"the skipped task shows {result.state}, not REVOKED"


def celery_control(worker, *arguments: str) -> str:
    """Run ``celery -A config control <arguments>`` as a person would; return its output."""
    command = [sys.executable, "-m", "celery", "-A", "config", "control", *arguments]
    done = subprocess.run(
        command, cwd=PROJECT_DIR, env={**worker.env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"celery control {arguments} failed: {done.stdout}{done.stderr}"
    return done.stdout


def test_celery_control_revoke_command_line_cancels_through_tasksignal(worker):
    result = tasks.count_with_checkpoints.delay(steps=100_000)
    wait_until_running(result)
    output = celery_control(worker, "revoke", result.id)
    assert "cancelled through tasksignal" in output, f"the reply says: {output}"
    signal = cancel_of(result.id)
    assert signal.outcome == Outcome.COOPERATIVE, f"the command's cancel says {signal.outcome}"


def test_celery_control_terminate_command_line_kills_in_isolation(worker):
    result = tasks.hold_the_gil.delay()
    wait_until_running(result)
    celery_control(worker, "terminate", "SIGKILL", result.id)
    signal = cancel_of(result.id)
    assert signal.outcome == Outcome.KILLED, f"the command's cancel says {signal.outcome}"
    assert signal.message == TERMINATE_MESSAGE, f"the row does not say terminate: {signal}"


def test_revoke_terminate_of_a_plain_task_keeps_celerys_behaviour(worker, tmp_path):
    marker = tmp_path / "started"
    result = tasks.plain_sleep.delay(str(marker), 60)
    wait_for(marker.exists, 15, "the plain task to start")
    current_app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    wait_for(lambda: result.state == "REVOKED", 10, "Celery to terminate the plain task")
    time.sleep(0.5)  # what the worker holding it would have written by now
    rows = CeleryTaskSignal.objects.filter(task_id=result.id, completed=True)
    assert not rows.exists(), f"a plain task's revoke went through tasksignal: {list(rows)}"


def test_revoke_of_a_plain_task_before_it_arrives_still_skips_it(make_worker, tmp_path):
    marker = tmp_path / "started"
    single = make_worker(concurrency=1)
    parked = f"{single.queue}-parked"
    result = tasks.plain_sleep.apply_async((str(marker), 0.1), queue=parked)
    current_app.control.revoke(result.id)  # no worker holds it: a cancel row is written too
    wait_for(
        lambda: CeleryTaskSignal.objects.filter(task_id=result.id).exists(),
        10,
        "the revoke to reach the worker",
    )
    current_app.control.add_consumer(parked, destination=[single.node_name], reply=True)
    wait_for(lambda: result.state == "REVOKED", 15, "Celery to skip the revoked plain task")
    assert not marker.exists(), "a plain task revoked before it arrived ran"
    signal = wait_until_completed(CeleryTaskSignal.objects.get(task_id=result.id))
    assert signal.outcome == Outcome.SKIPPED, f"its cancel row says {signal.outcome}"


def test_celery_revoke_still_terminates_blindly_for_baselines(worker):
    result = tasks.sleep_without_checkpoints.delay(60)
    wait_until_running(result)
    celery_revoke(current_app, result.id, terminate=True, signal="SIGKILL")
    wait_for(lambda: result.state == "REVOKED", 10, "Celery's own revoke to terminate the task")
    time.sleep(0.5)  # what a worker going through tasksignal would have written by now
    rows = list(CeleryTaskSignal.objects.filter(task_id=result.id))
    assert rows == [], f"Celery's own revoke went through tasksignal: {rows}"
