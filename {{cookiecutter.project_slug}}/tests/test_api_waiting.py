"""Seeing a stop without polling: ``?wait=`` on a real gunicorn (``bin/web``) and worker.

A waiting request is answered by the stop itself (its notice on the done channel), or by
its deadline with the state as it is; it holds no database connection while it waits, one
web node serves hundreds at once, and one whose client hangs up is released.
"""

import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request
import uuid

import psutil
import pytest
from django.db import connection

from tasksignal import notify, sql
from tasksignal.auth import create_token
from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome, RunState
from tasksignal.testing import WebProcess
from tasksignal.waiting import CLIENT_CHECK
from tests import tasks
from tests.conftest import database_url, wait_for, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

WAITERS = 256
POOL_SIZE = 4


@pytest.fixture
def web(tmp_path):
    """gunicorn with one worker process (so /healthz counts every waiter) and many threads."""
    env = {
        "DATABASE_URL": database_url(),
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": str(WAITERS + 16),
        "DATABASE_POOL_SIZE": str(POOL_SIZE),
    }
    with WebProcess(env=env, log_path=tmp_path / "web.log") as process:
        yield process


@pytest.fixture
def token(django_user_model) -> str:
    user = django_user_model.objects.create_superuser("waiter", "w@example.com", "pw")
    return create_token(user)[1]


def call(web, token: str, method: str, path: str, timeout: float = 90.0) -> tuple[int, dict]:
    request = urllib.request.Request(  # noqa: S310 - our own server on loopback
        f"{web.url}{path}",
        data=b"" if method == "POST" else None,
        method=method,
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def waiting(web) -> int:
    return call(web, "", "GET", "/healthz")[1]["waiting"]


def web_sessions(web) -> int:
    """PostgreSQL sessions held by gunicorn's processes (by local port)."""
    port = int(connection.settings_dict["PORT"] or 5432)
    return len(
        {
            c.laddr.port
            for pid in [web.process.pid, *web.child_pids()]
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port
        }
    )


def running_record() -> str:
    task_id = str(uuid.uuid4())
    TaskRun.objects.create(task_id=task_id, task_name="tests.tasks.elsewhere", state="running")
    return task_id


def test_a_waiting_cancel_is_answered_as_soon_as_the_task_stops(worker, web, token):
    result = tasks.count_with_checkpoints.delay(steps=100_000)
    wait_until_running(result)
    wait_for(lambda: TaskRun.objects.filter(task_id=result.id).exists(), 5, "the run record")
    started = time.monotonic()
    status, body = call(web, token, "POST", f"/api/tasks/{result.id}/cancel/?wait=60")
    took = time.monotonic() - started
    assert status == 200, body
    assert (body["completed"], body["outcome"]) == (True, Outcome.COOPERATIVE), body
    assert body["latency_ms"] is not None, body
    assert body["latency_ms"] < 5000, body
    assert took < 5, f"answered after {took:.1f}s: not by the stop itself"


def test_a_waiting_status_read_is_answered_when_the_task_ends(worker, web, token):
    result = tasks.echo.delay("the result", 1.0)
    wait_until_running(result)
    wait_for(lambda: TaskRun.objects.filter(task_id=result.id).exists(), 5, "the run record")
    status, body = call(web, token, "GET", f"/api/tasks/{result.id}/?wait=60")
    assert status == 200, body
    assert (body["finished"], body["state"], body["result"]) == (True, "SUCCESS", "the result")


def test_the_deadline_answers_with_the_state_as_it_is(web, token):
    task_id = running_record()
    started = time.monotonic()
    status, body = call(web, token, "POST", f"/api/tasks/{task_id}/cancel/?wait=0.5")
    took = time.monotonic() - started
    assert status == 202, body
    assert body["completed"] is False, body
    assert 0.5 <= took < 5, f"answered after {took:.2f}s for a 0.5 s deadline"


def test_hundreds_of_waiters_hold_no_connection_and_are_all_answered(web, token):
    task_ids = [running_record() for _ in range(WAITERS)]
    with concurrent.futures.ThreadPoolExecutor(WAITERS) as pool:
        answers = [
            pool.submit(call, web, token, "POST", f"/api/tasks/{t}/cancel/?wait=60")
            for t in task_ids
        ]
        wait_for(lambda: waiting(web) == WAITERS, 60, f"{WAITERS} requests to be waiting")
        held = web_sessions(web)
        assert held <= POOL_SIZE + 1, f"{WAITERS} waiters hold {held} database sessions"
        # What a worker node writes when its tasks stop: one statement, announced.
        with connection.cursor() as cursor:
            cursor.execute(
                sql.complete_cancels_of(),
                {
                    "outcome": Outcome.COOPERATIVE,
                    "error": "",
                    "keys": task_ids,
                    "done_channel": notify.done_channel(),
                },
            )
        started = time.monotonic()
        results = [answer.result(timeout=30) for answer in answers]
        took = time.monotonic() - started
    statuses = {status for status, _ in results}
    outcomes = {body.get("outcome") for _, body in results}
    assert (statuses, outcomes) == ({200}, {Outcome.COOPERATIVE}), (statuses, outcomes)
    assert took < 10, f"{WAITERS} waiters took {took:.1f}s to be answered"


def test_a_cancel_completed_while_the_hub_reconnects_is_answered_once_it_is_back(web, token):
    """The completion's notice is lost while the hub is away; its reconnection wakes the
    waiter, which must look for itself (a PostgreSQL restart left waiters asleep until
    their deadline)."""
    task_id = running_record()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, web, token, "POST", f"/api/tasks/{task_id}/cancel/?wait=60")
        wait_for(lambda: waiting(web) == 1, 10, "the request to wait")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'tasksignal waiting hub'"
            )
            assert cursor.fetchone() is not None, "no waiting hub session to cut"
        time.sleep(0.2)  # the hub is away for about a second
        with connection.cursor() as cursor:
            cursor.execute(
                sql.complete_cancels_of(),
                {
                    "outcome": Outcome.COOPERATIVE,
                    "error": "",
                    "keys": [task_id],
                    "done_channel": notify.done_channel(),
                },
            )
        started = time.monotonic()
        status, body = answer.result(timeout=90)
    took = time.monotonic() - started
    assert (status, body.get("outcome")) == (200, Outcome.COOPERATIVE), body
    assert took < 10, f"the waiter was answered {took:.1f}s after the completion"


def test_a_waiter_whose_client_hangs_up_is_released(web, token):
    task_id = running_record()
    request = (
        f"POST /api/tasks/{task_id}/cancel/?wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", web.port)) as client:
        client.sendall(request.encode())
        wait_for(lambda: waiting(web) == 1, 10, "the request to wait")
    wait_for(lambda: waiting(web) == 0, CLIENT_CHECK + 5, "the hung-up waiter to be released")
    assert CeleryTaskSignal.objects.get(task_id=task_id).completed is False


def test_a_cancel_to_a_task_that_finished_answers_too_late_without_waiting(web, token):
    task_id = running_record()
    TaskRun.objects.filter(task_id=task_id).update(state=RunState.SUCCEEDED)
    started = time.monotonic()
    status, body = call(web, token, "POST", f"/api/tasks/{task_id}/cancel/?wait=60")
    assert (status, body["outcome"]) == (200, Outcome.TOO_LATE), body
    assert time.monotonic() - started < 5, "a too-late cancel waited"
