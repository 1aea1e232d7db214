"""The worker node's runtime: what it costs a node, what Celery's tools see, what it leaves.

Every test runs real prefork workers (``bin/worker``) on the test database and the shared
Redis; the node lives in each worker's main process.
"""

import threading
import time
import uuid

import psutil
import pytest
from celery import current_app, states
from django.db import connection

from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome, RunState
from tests import tasks
from tests.conftest import cancel_running, wait_for, wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def run_state(task_id: str) -> str | None:
    return TaskRun.objects.filter(task_id=task_id).values_list("state", flat=True).first()


def backends_of(worker) -> int:
    """How many PostgreSQL sessions the worker's processes (main and pool) hold now.

    Counted by the local ports of their connections to the server: a socket a pool process
    inherited from the main process is the same session.
    """
    server_port = int(connection.settings_dict["PORT"] or 5432)
    return len(
        {
            conn.laddr.port
            for pid in [worker.process.pid, *worker.child_pids()]
            for conn in psutil.Process(pid).net_connections(kind="tcp")
            if conn.raddr and conn.raddr.port == server_port
        }
    )


@pytest.mark.parametrize("concurrency", [2, 16])
def test_a_node_holds_at_most_two_connections_beyond_its_tasks_own(make_worker, concurrency):
    node = make_worker(concurrency=concurrency)
    results = [
        tasks.hold_a_connection.apply_async((6.0,), queue=node.queue) for _ in range(concurrency)
    ]
    for result in results:
        wait_until_running(result, timeout=30)
    time.sleep(0.5)  # every task has opened its connection by now
    held = backends_of(node)
    assert held <= concurrency + 2, (
        f"{held} connections for {concurrency} tasks holding one each: the node adds "
        f"{held - concurrency}, more than 2"
    )
    for result in results:
        result.get(timeout=30)


def test_pool_processes_run_no_signalling_thread(make_worker):
    node = make_worker(concurrency=3)
    result = tasks.count_with_checkpoints.apply_async(kwargs={"steps": 300}, queue=node.queue)
    pid = wait_until_running(result)
    CeleryTaskSignal.objects.pause(result.id)
    wait_for(lambda: run_state(result.id) == RunState.PAUSED, 5, "the pause to be recorded")
    threads = {child: psutil.Process(child).num_threads() for child in node.child_pids()}
    assert threads[pid] == 1, f"the paused task's process runs {threads[pid]} threads"
    assert set(threads.values()) == {1}, f"pool processes with threads: {threads}"
    CeleryTaskSignal.objects.cancel(result.id)


def test_progress_reaches_the_run_record(worker):
    result = tasks.count_with_checkpoints.delay(steps=300, step_seconds=0.01)
    wait_until_running(result)

    def progress():
        return TaskRun.objects.filter(task_id=result.id).values_list("progress_current", flat=True)

    first = wait_for(lambda: (progress() or [None])[0], 5, "a first progress record")
    later = wait_for(lambda: (progress()[0] or 0) > first and progress()[0], 5, "more progress")
    assert later > first, f"progress did not move: {first} then {later}"
    CeleryTaskSignal.objects.cancel(result.id)


def test_a_task_holding_the_gil_shows_as_running_within_a_second(worker):
    result = tasks.hold_the_gil.delay()
    wait_until_running(result)
    started = time.monotonic()
    wait_for(lambda: run_state(result.id) == RunState.RUNNING, 1.5, "the run recorded running")
    assert time.monotonic() - started <= 1.0, "recorded running more than a second after start"
    cancel_running(result)


def test_a_cancelled_run_followed_by_a_gil_holder_in_the_same_process_is_recorded_at_once(
    make_worker,
):
    single = make_worker(concurrency=1)
    cancelled = tasks.count_with_checkpoints.apply_async(
        kwargs={"steps": 10**5}, queue=single.queue
    )
    wait_until_running(cancelled)
    gil = tasks.hold_the_gil.apply_async(queue=single.queue)  # next in the same process
    wait_until_completed(CeleryTaskSignal.objects.cancel(cancelled.id))
    wait_until_running(gil)
    wait_for(
        lambda: run_state(cancelled.id) == RunState.CANCELLED, 1.0, "the run recorded cancelled"
    )
    cancel_running(gil)


def test_celery_events_of_a_cancelled_task_include_task_revoked(make_worker):
    node = make_worker(concurrency=2, extra_args=("--task-events",))
    seen: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with current_app.connection_for_read() as conn:

            def note(event) -> None:
                seen.append(f"{event['type']} {event.get('uuid')}")

            receiver = current_app.events.Receiver(conn, handlers={"*": note})
            ready.set()
            receiver.capture(limit=None, timeout=15, wakeup=False)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.5)
    result = tasks.count_with_checkpoints.apply_async(kwargs={"steps": 10**5}, queue=node.queue)
    cancel_running(result)
    wait_for(lambda: f"task-revoked {result.id}" in seen, 10, "a task-revoked event")
    assert f"task-started {result.id}" in seen, f"events seen: {seen}"


def test_task_revoked_receivers_run_in_the_worker_for_a_cancelled_task(make_worker, tmp_path):
    log = tmp_path / "revoked.log"
    node = make_worker(concurrency=2, env={tasks.REVOKED_LOG_VARIABLE: str(log)})
    result = tasks.count_with_checkpoints.apply_async(kwargs={"steps": 10**5}, queue=node.queue)
    cancel_running(result)
    lines = wait_for(lambda: log.exists() and log.read_text().splitlines(), 5, "task_revoked")
    assert lines == [f"{result.id} {node.process.pid} terminated=False"], lines


def test_a_cancel_of_a_reserved_task_skips_it_without_its_body_running(make_worker, tmp_path):
    marker = tmp_path / "started"
    # With a prefetch multiplier the node reserves more tasks than it has processes.
    single = make_worker(concurrency=1, env={"CELERY_WORKER_PREFETCH_MULTIPLIER": "4"})
    blocker = tasks.echo.apply_async(("blocker", 2.0), queue=single.queue)
    reserved = tasks.mark_started.apply_async((str(marker),), queue=single.queue)
    wait_until_running(blocker)

    def is_reserved() -> bool:
        replies = current_app.control.inspect([single.node_name], timeout=2).reserved() or {}
        return any(r["id"] == reserved.id for r in replies.get(single.node_name, []))

    wait_for(is_reserved, 10, "the second task to be reserved by the node")
    signal = wait_until_completed(CeleryTaskSignal.objects.cancel(reserved.id))
    assert blocker.get(timeout=15) == "blocker"
    assert signal.outcome == Outcome.SKIPPED, f"expected skipped, got {signal.outcome}"
    wait_for(lambda: reserved.state == states.REVOKED, 10, "REVOKED")
    assert not marker.exists(), "the body of a task cancelled while reserved ran"


def test_a_task_delivered_again_after_its_cancel_was_honoured_never_runs(worker, tmp_path):
    marker = tmp_path / "started"
    # Unique: the result backend outlives test databases (a stale SUCCESS is never replaced).
    task_id = f"honoured-{uuid.uuid4()}"
    # As a node that honoured the cancel and died before acknowledging the message leaves it.
    CeleryTaskSignal.objects.cancel(task_id)
    CeleryTaskSignal.objects.filter(task_id=task_id).complete(Outcome.COOPERATIVE)
    result = tasks.mark_started.apply_async((str(marker),), task_id=task_id)
    wait_for(lambda: result.state == states.REVOKED, 10, "the redelivered task to be skipped")
    assert not marker.exists(), "a task whose cancel was honoured ran again"
    signal = CeleryTaskSignal.objects.get(task_id=task_id)
    assert signal.outcome == Outcome.COOPERATIVE, "the honoured cancel was rewritten"


def active_queries(text: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT query FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
            " AND pid <> pg_backend_pid()",
            [f"%{text}%"],
        )
        return [row[0] for row in cursor.fetchall()]


def test_an_interrupted_task_leaves_no_query_running_on_the_server(worker):
    result = tasks.query_postgres_sleep.delay(60)
    wait_for(lambda: active_queries("pg_sleep"), 10, "the task's query to run")
    signal = cancel_running(result)
    assert signal.outcome == Outcome.INTERRUPTED, f"expected interrupted, got {signal.outcome}"
    wait_for(lambda: not active_queries("pg_sleep"), 5, "the interrupted query to end")


def test_a_killed_task_leaves_no_query_running_on_the_server(worker):
    result = tasks.ignore_interrupts_in_a_query.delay(60)
    wait_for(lambda: active_queries("pg_sleep"), 10, "the task's query to run")
    signal = cancel_running(result)
    assert signal.outcome == Outcome.KILLED, f"expected killed, got {signal.outcome}"
    wait_for(lambda: not active_queries("pg_sleep"), 5, "the killed task's query to end")


def test_a_worker_node_killed_and_restarted_mid_storm_loses_no_signal(make_worker):
    fast_redelivery = {"CELERY_VISIBILITY_TIMEOUT": "3"}
    first = make_worker(concurrency=4, env=fast_redelivery)
    doomed = [
        tasks.count_with_checkpoints.apply_async(kwargs={"steps": 10**5}, queue=first.queue)
        for _ in range(8)
    ]
    for result in doomed[:4]:
        wait_until_running(result)
    signals = [CeleryTaskSignal.objects.cancel(result.id) for result in doomed[:2]]
    wait_until_completed(signals[0])
    first.kill()  # main process and pool together, as a crash would
    signals += [CeleryTaskSignal.objects.cancel(result.id) for result in doomed[2:]]
    with make_worker(concurrency=4, env=fast_redelivery, queue=first.queue):
        outcomes = [wait_until_completed(signal, timeout=60).outcome for signal in signals]
    assert all(outcome in Outcome.STOPPED for outcome in outcomes), f"outcomes: {outcomes}"
    left = CeleryTaskSignal.objects.pending().filter(task_id__in=[r.id for r in doomed])
    assert not left.exists(), f"signals never completed: {list(left)}"
