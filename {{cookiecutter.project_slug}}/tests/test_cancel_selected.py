"""Cancels of tasks found by what they work on, by name and by a filter of runs."""

import uuid

import pytest
from django.contrib.auth.models import User

from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome, RunState
from tests import tasks
from tests.conftest import wait_for
from tests.test_cascade import cancels_of, lines, wait_all_stopped

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_cancel_for_stops_running_and_queued_tasks_and_leaves_finished_ones(make_worker, tmp_path):
    marker = tmp_path / "ran"
    node = make_worker(concurrency=1)
    user = User.objects.create(username=f"subject-{uuid.uuid4().hex[:8]}")
    finished = tasks.echo.apply_async_for(user, ("done",), queue=node.queue)
    assert finished.get(timeout=15) == "done"
    running = tasks.mark_and_wait.apply_async_for(user, (str(marker),), queue=node.queue)
    queued = tasks.mark_and_wait.apply_async_for(user, (str(marker),), queue=node.queue)
    wait_for(lambda: lines(marker), 15, "the first task for the user to start")
    reach = CeleryTaskSignal.objects.cancel_for(user)
    assert (reach.reached, reach.still_to_stop) == (3, 2), f"reach {reach}"
    outcomes = wait_all_stopped([running.id, queued.id])
    assert outcomes == {running.id: Outcome.COOPERATIVE, queued.id: Outcome.SKIPPED}
    assert cancels_of([finished.id]) == {finished.id: Outcome.TOO_LATE}
    assert lines(marker) == [running.id], "the queued task ran after cancel_for"


def test_cancel_for_leaves_tasks_of_other_objects_alone(worker, tmp_path):
    marker = tmp_path / "ran"
    mine, theirs = (User.objects.create(username=uuid.uuid4().hex[:12]) for _ in range(2))
    cancelled = tasks.mark_and_wait.apply_async_for(mine, (str(marker),))
    sibling = tasks.echo.apply_async_for(theirs, ("unharmed", 1.0))
    wait_for(lambda: lines(marker), 15, "the task for the first user to start")
    CeleryTaskSignal.objects.cancel_for(mine)
    wait_all_stopped([cancelled.id])
    assert sibling.get(timeout=15) == "unharmed", "the other object's task was harmed"


def test_cancel_runs_by_name_stops_only_that_tasks_runs(worker, tmp_path):
    marker = tmp_path / "ran"
    named = [tasks.mark_and_wait.delay(str(marker)) for _ in range(2)]
    sibling = tasks.echo.delay("unharmed", 2.0)
    wait_for(lambda: len(lines(marker)) == 2, 15, "both runs of the named task to start")
    runs = TaskRun.objects.filter(task_name=tasks.mark_and_wait.name)
    wait_for(lambda: runs.filter(state=RunState.RUNNING).count() == 2, 10, "their records")
    reach = CeleryTaskSignal.objects.cancel_runs(runs)
    assert reach.reached == 2, f"the cancel by name reached {reach.reached} runs, not 2"
    wait_all_stopped(r.id for r in named)
    assert sibling.get(timeout=15) == "unharmed", "a task of another name was harmed"


def test_cancel_runs_by_worker_and_state_stops_the_runs_of_that_worker(make_worker, tmp_path):
    marker, other_marker = tmp_path / "ran", tmp_path / "other"
    node, other = make_worker(concurrency=2), make_worker(concurrency=1)
    on_node = [tasks.mark_and_wait.apply_async((str(marker),), queue=node.queue) for _ in range(2)]
    survivor = tasks.mark_and_wait.apply_async((str(other_marker), 2.0), queue=other.queue)
    wait_for(lambda: len(lines(marker)) == 2 and lines(other_marker), 15, "all three to start")
    runs = TaskRun.objects.filter(worker=node.node_name, state=RunState.RUNNING)
    wait_for(lambda: runs.count() == 2, 10, "the node's two runs recorded running")
    assert CeleryTaskSignal.objects.cancel_runs(runs).reached == 2
    wait_all_stopped(r.id for r in on_node)
    assert survivor.get(timeout=15) == survivor.id, "the run on the other worker was harmed"
