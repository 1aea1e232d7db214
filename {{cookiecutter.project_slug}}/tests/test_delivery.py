"""How signals reach workers: when the row commits, fast, to the one node holding the task,
and despite missed notifications."""

import shutil
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from celery import Celery, current_app
from celery.exceptions import TimeoutError as ResultTimeout
from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now

from tasksignal import notify
from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome, RunState
from tasksignal.testing import RedisServer, TcpProxy
from tests import tasks
from tests.conftest import database_url, wait_for, wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def listener():
    """A separate PostgreSQL session, as a worker node has, listening on a task's channel."""
    with psycopg.connect(database_url(), autocommit=True) as session:

        def listen(task_id: str):
            session.execute(f'LISTEN "{notify.signal_channel(task_id)}"')
            return session

        yield listen


def next_notice(session, timeout: float):
    return next(iter(session.notifies(timeout=timeout, stop_after=1)), None)


def test_notification_is_sent_only_when_the_row_commits(listener):
    session = listener("after-commit")
    with transaction.atomic():
        signal = CeleryTaskSignal.objects.cancel("after-commit")
        early = next_notice(session, 0.3)
        assert early is None, f"notified before commit: {early}"
    notice = next_notice(session, 2)
    assert notice is not None, "no notification after commit"
    assert notify.decode(notice.payload)["id"] == signal.pk


def cancel_then_roll_back() -> None:
    with transaction.atomic():
        CeleryTaskSignal.objects.cancel("rolled-back")
        raise RuntimeError("roll back")


def test_rolled_back_signal_is_never_announced(listener):
    session = listener("rolled-back")
    with pytest.raises(RuntimeError):
        cancel_then_roll_back()
    assert next_notice(session, 0.5) is None, "a rolled-back signal was announced"


def test_notification_carries_what_the_task_needs(listener):
    session = listener("carries")
    CeleryTaskSignal.objects.send("carries", "append_message", message="hello")
    payload = notify.decode(next_notice(session, 2).payload)
    assert (payload["signal"], payload["message"]) == ("append_message", "hello")


def node_state(worker) -> dict:
    """What a worker's node answers to ``celery inspect tasksignal``."""
    replies = current_app.control.broadcast(
        "tasksignal", reply=True, destination=[worker.node_name], timeout=5
    )
    return replies[0][worker.node_name]


def test_a_cancel_notice_reaches_only_the_node_running_the_task(make_worker):
    first = make_worker(concurrency=2, hostname="first@%h")
    second = make_worker(concurrency=2, hostname="second@%h")
    result = tasks.count_with_checkpoints.apply_async(kwargs={"steps": 100_000}, queue=first.queue)
    wait_until_running(result)
    wait_for(lambda: node_state(first)["tasks"].get(result.id, {}).get("listening"), 5, "listening")
    before = {w.node_name: node_state(w)["notices"] for w in (first, second)}
    signal = wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    assert signal.outcome == "cooperative", f"expected cooperative, got {signal.outcome}"
    heard = {w.node_name: node_state(w)["notices"] - before[w.node_name] for w in (first, second)}
    assert heard == {first.node_name: 1, second.node_name: 0}, f"notices heard: {heard}"


def test_a_node_holding_no_task_listens_to_nothing(make_worker):
    idle = make_worker(concurrency=4)
    state = node_state(idle)
    assert state["tasks"] == {}, f"an idle node holds {state['tasks']}"


def test_signal_missing_its_notification_is_delivered_by_reconciliation(worker):
    result = tasks.count_with_checkpoints.delay(steps=100_000)
    wait_until_running(result)
    # Written without pg_notify: only the node's periodic read of its tasks' signals sees it.
    signal = CeleryTaskSignal.objects.create(task_id=result.id, signal="cancel_task")
    interval = settings.TASKSIGNAL_RECONCILE_INTERVAL
    signal = wait_until_completed(signal, timeout=interval + 5)
    assert signal.outcome == "cooperative", f"expected cooperative, got {signal.outcome}"
    took = (signal.completed_at - signal.created).total_seconds()
    assert took <= interval + 1, f"reconciliation took {took:.1f}s, interval is {interval}s"


def test_prefetched_task_cancelled_while_queued_is_skipped(make_worker, tmp_path):
    marker = tmp_path / "started"
    with make_worker(concurrency=1) as single:
        # Queued for longer than kill_after: it must still skip itself, not be killed.
        blocker = tasks.echo.apply_async(("blocker", tasks.KILL_AFTER + 1.5), queue=single.queue)
        queued = tasks.mark_started.apply_async((str(marker),), queue=single.queue)
        signal = CeleryTaskSignal.objects.cancel(queued.id)
        assert blocker.get(timeout=15) == "blocker"
        signal = wait_until_completed(signal)
    assert signal.outcome == "skipped", f"expected skipped, got {signal.outcome}"
    assert not marker.exists(), "a task cancelled while queued ran its body"


def test_task_redelivered_after_its_worker_died_is_skipped_once_cancelled(make_worker, tmp_path):
    marker = tmp_path / "started"
    short_visibility = {"CELERY_VISIBILITY_TIMEOUT": "3"}
    first = make_worker(concurrency=1, env=short_visibility)
    result = tasks.mark_started.apply_async((str(marker), 60), queue=first.queue)
    wait_for(lambda: marker.exists(), 10, "the task to start on the first worker")
    first.kill()  # the message was never acknowledged (acks_late): it will come back
    signal = CeleryTaskSignal.objects.cancel(result.id)
    with make_worker(concurrency=1, env=short_visibility, queue=first.queue):
        signal = wait_until_completed(signal, timeout=30)
    assert signal.outcome == "skipped", f"expected skipped on redelivery, got {signal.outcome}"
    assert marker.read_text().splitlines() == [result.id], "the body ran again after redelivery"


def test_a_node_restarted_after_a_crash_settles_the_runs_it_left_running(make_worker, tmp_path):
    marker = tmp_path / "started"
    # Long enough that only the restarted node's own restore can bring the message back.
    long_visibility = {"CELERY_VISIBILITY_TIMEOUT": "600"}
    crashed = make_worker(concurrency=2, hostname="crashy@%h", env=long_visibility)
    cancelled, requeued = (
        tasks.mark_started.apply_async((str(marker), 60), queue=crashed.queue),
        tasks.mark_started.apply_async((str(marker), 1), queue=crashed.queue),
    )
    wait_for(
        lambda: (
            TaskRun.objects.filter(
                task_id__in=[cancelled.id, requeued.id], state=RunState.RUNNING
            ).count()
            == 2
        ),
        15,
        "both runs to be recorded running",
    )
    crashed.kill()
    signal = CeleryTaskSignal.objects.cancel(cancelled.id)  # nobody listens: it stays pending
    with make_worker(
        concurrency=2, hostname=crashed.hostname, env=long_visibility, queue=crashed.queue
    ):
        signal = wait_until_completed(signal, timeout=15)
        assert signal.outcome == Outcome.KILLED, f"the crash stopped it, not {signal.outcome}"
        run = TaskRun.objects.get(task_id=cancelled.id)
        assert run.state == RunState.CANCELLED, f"the cancelled run says {run.state}"
        assert requeued.get(timeout=20) == "done", (
            "the uncancelled run's message was not given back to the queue by the new node"
        )
    bodies = marker.read_text().splitlines()
    assert bodies.count(cancelled.id) == 1, "the cancelled task's body ran again after the crash"
    assert bodies.count(requeued.id) == 2, "the uncancelled task did not run again"


def test_a_starting_node_ends_the_records_a_dead_node_left_of_runs_celery_saw_finish(
    make_worker,
):
    # What a node killed between a task's end and its next batch of records leaves: the
    # result is stored, the run record still says queued (or running), a cancel pending.
    succeeded, failed = f"ended-{uuid.uuid4()}", f"ended-{uuid.uuid4()}"
    TaskRun.objects.create(task_id=succeeded, task_name="tests.tasks.echo", state=RunState.QUEUED)
    TaskRun.objects.create(
        task_id=failed, task_name="tests.tasks.echo", state=RunState.RUNNING, worker="gone@host"
    )
    current_app.backend.store_result(succeeded, "done", "SUCCESS")
    current_app.backend.store_result(failed, ValueError("boom"), "FAILURE")
    signal = CeleryTaskSignal.objects.cancel(succeeded)
    with make_worker(concurrency=1):
        signal = wait_until_completed(signal, timeout=15)
    states = dict(
        TaskRun.objects.filter(task_id__in=[succeeded, failed]).values_list("task_id", "state")
    )
    assert states == {succeeded: RunState.SUCCEEDED, failed: RunState.FAILED}, (
        f"the new node did not end the records from Celery's results: {states}"
    )
    assert signal.outcome == Outcome.TOO_LATE, f"the finished run's cancel says {signal.outcome}"


def lost_message_run(**kwargs) -> str:
    """What a node killed while a message was on its way to it leaves (or a web process that
    died between recording a run and publishing it): a queued record, no message anywhere."""
    task_id = str(uuid.uuid4())
    TaskRun.objects.create(task_id=task_id, state=RunState.QUEUED, **kwargs)
    TaskRun.objects.filter(task_id=task_id).update(updated_at=Now() - timedelta(minutes=1))
    return task_id


def test_a_starting_node_sends_again_a_queued_run_whose_message_was_lost(make_worker):
    task_id = lost_message_run(task_name="tests.tasks.echo", kwargs={"value": "sent again"})
    with make_worker(own_queue=False, concurrency=1):  # where the task is routed
        result = current_app.AsyncResult(task_id)
        wait_for(lambda: result.ready(), 20, "the lost run to be sent again and to end")
    assert (result.state, result.result) == ("SUCCESS", "sent again"), result.state


def test_a_starting_node_settles_a_cancelled_queued_run_whose_message_was_lost(make_worker):
    task_id = lost_message_run(task_name="tests.tasks.echo", kwargs={"value": "never"})
    signal = CeleryTaskSignal.objects.cancel(task_id)
    with make_worker(concurrency=1):
        signal = wait_until_completed(signal, timeout=20)
    run = TaskRun.objects.get(task_id=task_id)
    assert (signal.outcome, run.state) == (Outcome.SKIPPED, RunState.CANCELLED), (
        f"the lost cancelled run ended {run.state} with its cancel {signal.outcome}"
    )
    assert current_app.AsyncResult(task_id).state == "PENDING", "the cancelled run was sent"


def test_two_workers_with_different_hostnames_each_honour_cancels(make_worker):
    first = make_worker(concurrency=2, hostname="first@%h")
    second = make_worker(concurrency=2, hostname="second@%h", queue=first.queue)
    results = [
        tasks.count_with_checkpoints.apply_async(kwargs={"steps": 100_000}, queue=first.queue)
        for _ in range(4)
    ]
    for result in results:
        wait_until_running(result)
    signals = [CeleryTaskSignal.objects.cancel(r.id) for r in results]
    outcomes = [wait_until_completed(s).outcome for s in signals]
    hosts = {_run_worker(result.id) for result in results}
    assert outcomes == ["cooperative"] * 4, f"outcomes: {outcomes}"
    assert hosts == {first.node_name, second.node_name}, f"tasks ran on {hosts}"


def _run_worker(task_id: str) -> str:
    from tasksignal.models import TaskRun

    wait_for(lambda: TaskRun.objects.filter(task_id=task_id).exists(), 5, f"a record of {task_id}")
    return TaskRun.objects.get(task_id=task_id).worker


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer(tmp_path) as server:
        yield server


def redis_env(url: str) -> dict[str, str]:
    """A worker's environment for the Redis at ``url`` as broker, backend and notices."""
    return {"REDIS_URL": url, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}


def private_app(url: str) -> Celery:
    """A client of the private Redis with the same broker options as the worker."""
    app = Celery(broker=url, backend=url, set_as_current=False)
    app.conf.broker_transport_options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    return app


def test_cancel_sent_while_redis_is_down_is_honoured_at_once(
    private_redis, make_worker, monkeypatch
):
    # Celery lets these variables override the URLs an app is given: drop them for our clients.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    app = private_app(private_redis.url)
    with make_worker(concurrency=1, env=redis_env(private_redis.url), app=app) as private_worker:
        result = app.send_task(
            "tests.tasks.count_with_checkpoints",
            kwargs={"steps": 3000},
            queue=private_worker.queue,
        )
        wait_until_running(result)
        private_redis.stop()
        signal = wait_until_completed(CeleryTaskSignal.objects.cancel(result.id), timeout=5)
        private_redis.start()
        assert signal.outcome == "cooperative", f"expected cooperative, got {signal.outcome}"
        took = (signal.completed_at - signal.created).total_seconds()
        assert took < 1, f"the cancel took {took:.1f}s although signals do not need Redis"
        # A fresh client: the first one's result listener gave up while Redis was down.
        after = private_app(private_redis.url)
        answer = after.send_task(
            "tests.tasks.echo", args=("after restart",), queue=private_worker.queue
        ).get(timeout=30)
        assert answer == "after restart", "worker did not serve again after Redis came back"


class GoneAfterHandingOver(TcpProxy):
    """Redis as a worker sees it when Redis stops just after handing the worker the message
    of task ``task_id`` (the ``BRPOP`` answer), before the worker records it as
    unacknowledged: every connection is cut at the worker's next command (``gone``), and
    refused until :meth:`restore`."""

    def __init__(self, upstream: str, task_id: str) -> None:
        self.marker = task_id.encode()
        self.handed_over, self.gone = threading.Event(), threading.Event()
        super().__init__(upstream)

    def replied(self, data: bytes) -> None:
        """Note when the task's message reached the worker."""
        if self.marker in data:
            self.handed_over.set()

    def request(self, data: bytes) -> bool:
        """Cut everything at the first command after the hand-over."""
        if self.handed_over.is_set() and not self.gone.is_set():
            self.gone.set()
            self.cut()
        return not self.refusing


def test_a_task_redis_hands_over_as_it_goes_away_still_runs(
    private_redis, make_worker, monkeypatch
):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    task_id = str(uuid.uuid4())
    app = private_app(private_redis.url)  # the test itself reaches Redis directly
    with (
        GoneAfterHandingOver(private_redis.url, task_id) as proxy,
        make_worker(concurrency=1, env=redis_env(proxy.url), app=app) as private_worker,
    ):
        result = app.send_task(
            "tests.tasks.echo", args=("handed over",), queue=private_worker.queue,
            task_id=task_id,
        )  # fmt: skip
        assert proxy.gone.wait(15), "the worker never took the task's message"
        time.sleep(3)  # Redis is away
        proxy.restore()
        try:
            answer = result.get(timeout=30)
        except ResultTimeout:
            pytest.fail("the task Redis handed over as it went away never ran: lost")
    assert answer == "handed over", f"the task returned {answer!r}"
