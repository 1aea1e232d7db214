"""Cascades: a signal that reaches a task and everything it started, on real workers."""

import os
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
from celery import chain, chord, group, states
from celery.exceptions import TaskRevokedError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasksignal.cascade import BATCH_SIZE, cancel_result, descendants
from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import Outcome, RunState
from tasksignal.testing import PROJECT_DIR, PostgresServer
from tests import tasks
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def lines(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def cancels_of(task_ids) -> dict[str, str]:
    """The outcome of each task's cancel ('' while pending)."""
    rows = CeleryTaskSignal.objects.filter(task_id__in=list(task_ids), signal=CANCEL_TASK)
    return dict(rows.values_list("task_id", "outcome"))


def wait_all_stopped(task_ids, timeout: float = 20.0) -> dict[str, str]:
    """Wait until every one of ``task_ids`` has a cancel that stopped it; return outcomes."""
    task_ids = list(task_ids)

    def stopped():
        outcomes = cancels_of(task_ids)
        return len(outcomes) == len(task_ids) and all(
            outcome in Outcome.STOPPED for outcome in outcomes.values()
        )

    wait_for(stopped, timeout, f"every one of {len(task_ids)} tasks stopped by its cancel")
    return cancels_of(task_ids)


@pytest.mark.worker
def test_cascade_over_a_chain_stops_the_link_and_the_rest_never_runs(worker, tmp_path):
    marker = tmp_path / "ran"
    result = chain(
        tasks.mark_and_wait.si(str(marker)),
        tasks.mark_and_wait.si(str(marker), 0),
        tasks.mark_and_wait.si(str(marker), 0),
    ).delay()
    first = result.parent.parent
    wait_for(lambda: lines(marker), 15, "the chain's first link to start")
    signal = CeleryTaskSignal.objects.cancel(first.id, cascade=True)
    assert signal.reached == 3, f"the cancel reached {signal.reached} tasks, not the 3 links"
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)  # the last link's result: revoked, not pending for ever
    assert lines(marker) == [first.id], f"links after the cancelled one ran: {lines(marker)}"
    assert cancels_of([first.id])[first.id] == Outcome.COOPERATIVE


@pytest.mark.worker
def test_cascade_over_a_group_stops_every_member_running_or_queued(worker, tmp_path):
    marker = tmp_path / "ran"
    members = 6  # the shared worker runs 4 at a time: 2 wait in the queue
    result = group(tasks.mark_and_wait.si(str(marker)) for _ in range(members)).apply_async()
    result.save()
    wait_for(lambda: len(lines(marker)) >= 4, 15, "four members to start")
    signal = CeleryTaskSignal.objects.cancel(result.id, cascade=True)
    assert signal.reached == members + 1, f"reached {signal.reached}, not the group and members"
    assert signal.still_to_stop == members + 1
    outcomes = wait_all_stopped(r.id for r in result.results)
    assert Outcome.COOPERATIVE in outcomes.values(), f"no running member stopped: {outcomes}"
    assert Outcome.SKIPPED in outcomes.values(), f"no queued member was skipped: {outcomes}"
    assert len(lines(marker)) <= 4, "a queued member ran after the cascade"


@pytest.mark.worker
def test_cascade_over_a_chord_never_runs_the_body_and_revokes_its_result(worker, tmp_path):
    marker, body_marker = tmp_path / "header", tmp_path / "body"
    header = [tasks.mark_and_wait.si(str(marker)) for _ in range(3)]
    result = chord(header, tasks.mark_and_wait.si(str(body_marker), 0)).delay()
    wait_for(lambda: len(lines(marker)) == 3, 15, "the chord's header to start")
    reach = cancel_result(result)
    assert reach.reached == 5, f"reached {reach.reached}: not the body, group and 3 tasks"
    wait_all_stopped(r.id for r in result.parent.results)
    with pytest.raises(TaskRevokedError):  # at once: neither waiting for ever nor ChordError
        result.get(timeout=10)
    assert result.state == states.REVOKED, f"the body's result is {result.state}"
    assert not lines(body_marker), "the chord's body ran after its header was cancelled"


@pytest.mark.worker
def test_a_cascade_completes_the_cancel_of_a_chord_body_that_is_never_sent(worker, tmp_path):
    marker = tmp_path / "header"
    header = [tasks.mark_and_wait.si(str(marker)) for _ in range(2)]
    result = chord(header, tasks.mark_and_wait.si(str(tmp_path / "body"), 0)).delay()
    wait_for(lambda: len(lines(marker)) == 2, 15, "the chord's header to start")
    cancel_result(result)
    wait_all_stopped(r.id for r in result.parent.results)
    body = CeleryTaskSignal.objects.filter(task_id=result.id)
    wait_for(lambda: body.filter(completed=True).exists(), 10, "the body's cancel to complete")
    assert body.get().outcome == Outcome.SKIPPED, f"the body's cancel: {body.get().outcome}"


@pytest.mark.worker
def test_cascade_reaches_a_tree_three_levels_deep(worker, tmp_path):
    marker = tmp_path / "ran"
    root = tasks.fan_out.delay(str(marker), depth=2, width=2)
    # root, its 2 children and their 4 children: the shared worker runs 4 at a time.
    wait_for(lambda: len(lines(marker)) >= 4, 15, "the tree's first two levels to start")
    signal = CeleryTaskSignal.objects.cancel(root.id, cascade=True)
    tree = [root.id, *descendants([root.id])]
    assert len(tree) == 7, f"the tree has {len(tree)} tasks recorded, not 7"
    assert signal.reached == 7
    wait_all_stopped(tree)
    started = set(lines(marker))
    assert started <= set(tree), f"tasks outside the recorded tree ran: {started - set(tree)}"


@pytest.mark.worker
def test_cascade_over_a_chain_of_a_chord_of_a_group_ends_every_level(worker, tmp_path):
    marker = tmp_path / "ran"
    step = tasks.mark_and_wait.si
    inner = chord(group(step(str(marker), 0), step(str(marker), 0)), step(str(marker), 0))
    result = chain(step(str(marker)), inner, step(str(marker), 0)).delay()
    first = result
    while first.parent is not None:
        first = first.parent
    wait_for(lambda: lines(marker), 15, "the chain's first link to start")
    recorded = descendants([first.id])
    signal = CeleryTaskSignal.objects.cancel(first.id, cascade=True)
    # The chord's two header tasks and body, and the last link (ids known before sending).
    assert len(recorded) >= 4, f"recorded before they were sent: {recorded}"
    assert signal.reached == 1 + len(recorded), f"reached {signal.reached} of {recorded}"
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    never_sent = [tasks.mark_and_wait.AsyncResult(task_id) for task_id in recorded]
    wait_for(lambda: all(r.state == states.REVOKED for r in never_sent), 5, "all of it REVOKED")
    assert lines(marker) == [first.id], f"tasks after the cancelled link ran: {lines(marker)}"


def root_with_a_late_grandchild(tmp_path):
    """A running root and, as its child, a plain task (nothing stops it) that starts a
    signal-aware child of its own one second later, writing to ``tmp_path / "ran"`` if its
    body runs. Returns the root and the plain task's result (its value: the late id)."""
    root = tasks.mark_and_wait.delay(str(tmp_path / "root"))
    wait_for(lambda: lines(tmp_path / "root"), 15, "the root to start")
    as_its_child = {"parent_id": root.id}
    arguments = (str(tmp_path / "children"), str(tmp_path / "ran"))
    return root, tasks.spawn_later.apply_async(arguments, **as_its_child)


@pytest.mark.worker
def test_cascade_skips_a_child_started_after_the_cancel(worker, tmp_path):
    marker = tmp_path / "ran"
    root, spawner = root_with_a_late_grandchild(tmp_path)
    CeleryTaskSignal.objects.cancel(root.id, cascade=True)
    child_id = spawner.get(timeout=15)
    outcome = wait_all_stopped([child_id])[child_id]
    assert outcome == Outcome.SKIPPED, f"the late child's cancel is {outcome}, not skipped"
    assert not lines(marker), "the child started after the cascade ran its body"


@pytest.mark.worker
def test_cascade_reaches_members_of_a_group_on_two_worker_nodes(make_worker, tmp_path):
    marker = tmp_path / "ran"
    queue = f"cascade-{uuid.uuid4().hex[:6]}"
    nodes = [make_worker(queue=queue, concurrency=2) for _ in range(2)]
    signatures = (tasks.mark_and_wait.si(str(marker)) for _ in range(4))
    result = group(signatures).apply_async(queue=queue)
    wait_for(lambda: len(lines(marker)) == 4, 15, "the four members to start on two nodes")
    CeleryTaskSignal.objects.cancel(result.id, cascade=True)
    members = [r.id for r in result.results]
    outcomes = wait_all_stopped(members)
    assert set(outcomes.values()) == {Outcome.COOPERATIVE}, f"members ended {outcomes}"
    runs = TaskRun.objects.filter(task_id__in=members)
    workers = set(
        wait_for(lambda: set(runs.values_list("worker", flat=True)) - {""}, 10, "records")
    )
    assert workers == {node.node_name for node in nodes}, f"the members ran on {workers} only"


@pytest.mark.worker
def test_cascade_pauses_and_resumes_every_member_of_a_group(worker):
    result = group(tasks.count_with_checkpoints.si(steps=300) for _ in range(3)).apply_async()
    runs = TaskRun.objects.filter(task_id__in=[r.id for r in result.results])
    wait_for(lambda: runs.filter(state=RunState.RUNNING).count() == 3, 15, "members running")
    pause = CeleryTaskSignal.objects.pause(result.id, cascade=True)
    assert pause.reached == 4, f"the pause reached {pause.reached}, not the group and 3 members"
    wait_for(lambda: runs.filter(state=RunState.PAUSED).count() == 3, 10, "all members paused")
    CeleryTaskSignal.objects.resume(result.id, cascade=True)
    assert [r["steps"] for r in result.get(timeout=30)] == [300] * 3, "a member did not resume"


@pytest.mark.worker
def test_a_child_started_after_a_cascade_pause_starts_paused_and_resumes(worker, tmp_path):
    root, spawner = root_with_a_late_grandchild(tmp_path)
    CeleryTaskSignal.objects.pause(root.id, cascade=True)
    child_id = spawner.get(timeout=15)
    child_runs = TaskRun.objects.filter(task_id=child_id, state=RunState.PAUSED)
    wait_for(child_runs.exists, 10, "the late child to be recorded paused")
    CeleryTaskSignal.objects.resume(root.id, cascade=True)
    child = tasks.mark_and_wait.AsyncResult(child_id)
    assert child.get(timeout=15) == child_id, "the late child did not carry on after the resume"
    CeleryTaskSignal.objects.cancel(root.id)


def test_cascade_writes_one_statement_per_batch_not_one_per_task():
    root = uuid.uuid4().hex
    tasks_count = 1000
    TaskLineage.objects.bulk_create(
        TaskLineage(task_id=f"{root}-{n}", ancestors=[root]) for n in range(tasks_count)
    )
    with CaptureQueriesContext(connection) as queries:
        signal = CeleryTaskSignal.objects.cancel(root, cascade=True)
    batches = -(-tasks_count // BATCH_SIZE)
    transaction_control = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE SAVEPOINT")
    statements = [
        q["sql"] for q in queries.captured_queries if not q["sql"].startswith(transaction_control)
    ]
    # The root's row, the descendants' query, one INSERT ... SELECT per batch.
    assert len(statements) == 2 + batches, f"{len(statements)} statements for {tasks_count} tasks"
    assert signal.reached == tasks_count + 1
    pending = CeleryTaskSignal.objects.pending(signal=CANCEL_TASK)
    assert pending.filter(task_id__startswith=root, cascade=True).count() == tasks_count + 1


@pytest.fixture
def private_postgres():
    """A PostgreSQL server of the test's own, migrated, so that the test may restart it."""
    try:
        server = PostgresServer()
    except RuntimeError as exc:  # no server programs here
        pytest.skip(str(exc))
    with server:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=PROJECT_DIR, env={**os.environ, "DATABASE_URL": server.url}, check=True,
        )  # fmt: skip
        yield server


def test_a_task_sent_by_a_task_while_postgresql_restarts_still_gets_its_lineage(
    private_postgres, make_worker, tmp_path
):
    worker = make_worker(concurrency=1, env={"DATABASE_URL": private_postgres.url})
    started, cue = tmp_path / "started", tmp_path / "cue"
    parent = tasks.send_child_on_cue.apply_async((str(started), str(cue)), queue=worker.queue)
    wait_for(started.exists, 15, "the parent task to start")
    private_postgres.stop()
    cue.touch()  # the parent sends its child now, with PostgreSQL down
    time.sleep(2)
    private_postgres.start()
    child_id = parent.get(timeout=30)
    with psycopg.connect(private_postgres.url) as database:
        row = database.execute(
            "SELECT ancestors FROM tasksignal_tasklineage WHERE task_id = %s", [child_id]
        ).fetchone()
    assert row is not None, (
        "the child sent during the restart has no lineage row: a cascade and the API know it "
        "only once a node admits it"
    )
    assert row[0][-1] == parent.id, f"the child's lineage {row[0]} does not end with its parent"
