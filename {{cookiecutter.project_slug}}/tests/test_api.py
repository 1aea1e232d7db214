"""The JSON API over HTTP (Django's test client): statuses, bodies, auth, permissions.

No worker is needed: these tests check what the API answers and what it writes; a real
worker runs a task through the API in ``test_demo_api.py``.
"""

import hashlib
import json
import time
import uuid
from datetime import datetime, timedelta

import kombu.exceptions
import pytest
import redis
from celery import current_app
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.db import connection

from tasksignal.auth import create_token
from tasksignal.models import ApiToken, CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome

pytestmark = pytest.mark.django_db

STARTABLE = "tests.tasks.api_startable"


class Api:
    """Django's test client speaking JSON, with a bearer token unless told otherwise."""

    def __init__(self, client, secret: str | None) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def get(self, path: str, **kwargs):
        """GET ``path``."""
        return self.client.get(path, headers={**self.headers, **kwargs.pop("headers", {})})

    def post(self, path: str, body=None, *, raw: str | bytes | None = None, **kwargs):
        """POST ``body`` as JSON (or ``raw`` bytes as they are; neither: an empty body)."""
        data = raw if raw is not None else ("" if body is None else json.dumps(body))
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.post(path, data, content_type="application/json", headers=headers)


def user_with(*codenames: str, username: str = "operator") -> User:
    """An active, non-superuser user holding exactly the given tasksignal permissions."""
    user = User.objects.create_user(username)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


@pytest.fixture
def superuser() -> User:
    """A superuser: every permission."""
    return User.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def api(client, superuser) -> Api:
    """The API as the superuser, through a bearer token."""
    return Api(client, create_token(superuser, "tests")[1])


@pytest.fixture
def run() -> TaskRun:
    """A running task the API knows about."""
    return TaskRun.objects.create(
        task_id=str(uuid.uuid4()), task_name="tests.tasks.some_job", state=TaskRun.State.RUNNING
    )


def expect(response, status: int) -> dict:
    """Assert the status and a JSON body; return the body."""
    assert response.status_code == status, (
        f"expected {status}, got {response.status_code}: {response.content[:500]!r}"
    )
    assert response["Content-Type"] == "application/json", (
        f"every API answer is JSON, got {response['Content-Type']}: {response.content[:200]!r}"
    )
    return response.json()


def parse_time(value: str) -> datetime:
    """An ISO 8601 timestamp from a response."""
    return datetime.fromisoformat(value)


# -- starting tasks -------------------------------------------------------------------------
def test_start_records_a_queued_run_and_answers_202(api, settings):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]
    body = expect(api.post("/api/tasks/", {"task": STARTABLE, "kwargs": {"n": 1}}), 202)
    assert (body["task"], body["state"]) == (STARTABLE, "queued"), body
    run = TaskRun.objects.filter(task_id=body["id"]).first()
    assert run is not None, f"no TaskRun row for started task {body['id']}"
    assert (run.task_name, run.state) == (STARTABLE, "queued"), (run.task_name, run.state)


def test_start_queues_the_task_only_when_the_run_record_commits(
    api, settings, django_capture_on_commit_callbacks
):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        expect(api.post("/api/tasks/", {"task": STARTABLE}), 202)
    assert len(callbacks) == 1, f"expected the publish deferred to commit, got {callbacks}"


def test_start_answers_the_status_url_in_location(api, settings):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]
    response = api.post("/api/tasks/", {"task": STARTABLE})
    body = expect(response, 202)
    assert response["Location"] == f"/api/tasks/{body['id']}/", response.headers


def test_start_refuses_a_task_not_listed_in_the_setting_naming_the_allowed_ones(api, settings):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]
    body = expect(api.post("/api/tasks/", {"task": "os.system"}), 400)
    assert body["error"] == (
        f"task 'os.system' may not be started through the API; allowed: {STARTABLE}"
    ), body
    assert not TaskRun.objects.filter(task_name="os.system").exists(), (
        "a refused task left a run record"
    )


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "a JSON array"),
        ('{"task": 1}', "a task name that is not a string"),
        ('{"kwargs": {}}', "no task name"),
        ('{"task": "t", "kwargs": [1]}', "kwargs that are not an object"),
        ('{"task": "t", "args": [1]}', "an unknown field"),
        ('{"task": "t", "kwargs": {"x": NaN}}', "NaN, which is not JSON"),
        ("", "an empty body"),
        (b"\xff\xfe\x00", "bytes that are not text"),
    ],
)
def test_start_rejects_a_malformed_body_with_400(api, settings, raw, why):
    settings.TASKSIGNAL_STARTABLE_TASKS = ["t"]
    body = expect(api.post("/api/tasks/", raw=raw), 400)
    assert body["error"], f"400 for {why} has no message"


def test_start_accepts_kwargs_the_task_does_not_take_the_worker_fails_it(api, settings):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]
    expect(api.post("/api/tasks/", {"task": STARTABLE, "kwargs": {"no_such_arg": 1}}), 202)


def test_start_answers_413_for_a_body_over_the_upload_limit(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    expect(api.post("/api/tasks/", {"task": "t", "kwargs": {"x": "y" * 200}}), 413)


@pytest.mark.django_db(transaction=True)
def test_start_answers_503_and_forgets_the_run_when_the_broker_is_down(api, settings, monkeypatch):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]

    def broker_down(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:1")

    monkeypatch.setattr(current_app, "send_task", broker_down)
    body = expect(api.post("/api/tasks/", {"task": STARTABLE}), 503)
    assert "Redis" in body["error"], body
    # Only this task's runs: a live server's worker may still be writing other tests' records.
    assert not TaskRun.objects.filter(task_name=STARTABLE).exists(), (
        "a task that was never queued still has a queued run"
    )


@pytest.mark.django_db(transaction=True)
def test_start_answers_503_when_the_result_backend_gives_up_reconnecting(
    api, settings, monkeypatch
):
    settings.TASKSIGNAL_STARTABLE_TASKS = [STARTABLE]

    def backend_gave_up(*args, **kwargs):
        # What Celery's Redis result backend raises when it cannot subscribe to the result.
        cause = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1")
        raise RuntimeError("Retry limit exceeded while trying to reconnect") from cause

    monkeypatch.setattr(current_app, "send_task", backend_gave_up)
    body = expect(api.post("/api/tasks/", {"task": STARTABLE}), 503)
    assert "Redis" in body["error"], body
    # Only this task's runs: a live server's worker may still be writing other tests' records.
    assert not TaskRun.objects.filter(task_name=STARTABLE).exists(), (
        "a task that was never queued still has a queued run"
    )


# -- reading a task -------------------------------------------------------------------------
def test_status_of_a_running_task_reports_its_run(api, run):
    run.progress_current, run.progress_total = 3, 4
    run.save()
    body = expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    expected = {
        "id": run.task_id,
        "task": run.task_name,
        "state": "PENDING",
        "run_state": "running",
        "finished": False,
        "result": None,
        "error": None,
        "outcome": None,
        "progress": 0.75,
        "progress_message": None,
        "paused": False,
        "worker": None,
        "pid": None,
        "started_at": None,
        "finished_at": None,
        "cancel_requested_at": None,
        "stopped_at": None,
        "latency_ms": None,
        "signals": [],
    }
    assert body == expected, body


def test_status_reports_the_cancel_outcome_and_its_latency_from_the_database_clock(api, run):
    cancel = CeleryTaskSignal.objects.cancel(run.task_id)
    CeleryTaskSignal.objects.filter(pk=cancel.pk).complete("cooperative")
    cancel.refresh_from_db()
    body = expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    assert body["outcome"] == "cooperative", body
    assert parse_time(body["cancel_requested_at"]) == cancel.created, body
    assert parse_time(body["stopped_at"]) == cancel.completed_at, body
    expected_ms = (cancel.completed_at - cancel.created) / timedelta(milliseconds=1)
    assert body["latency_ms"] == pytest.approx(expected_ms, abs=0.001), body
    assert body["signals"] == [
        {
            "id": cancel.pk,
            "signal": "cancel_task",
            "message": "",
            "completed": True,
            "outcome": "cooperative",
            "error": None,
            "created": cancel.created.isoformat(),
            "completed_at": cancel.completed_at.isoformat(),
        }
    ], body["signals"]


def test_a_stopped_task_has_finished_only_once_its_cancel_outcome_is_written(api, run):
    cancel = CeleryTaskSignal.objects.cancel(run.task_id)
    # The stopped task stores REVOKED first; its node completes the cancel a moment later.
    current_app.backend.store_result(run.task_id, None, "REVOKED")
    try:
        stopping = expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
        CeleryTaskSignal.objects.filter(pk=cancel.pk).complete(Outcome.COOPERATIVE)
        stopped = expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    finally:
        current_app.backend.forget(run.task_id)
    assert (stopping["state"], stopping["finished"]) == ("REVOKED", False), (
        f"finished before the cancel's outcome was written: {stopping}"
    )
    assert (stopped["finished"], stopped["outcome"]) == (True, Outcome.COOPERATIVE), stopped


def test_status_says_paused_when_the_run_is_paused(api, run):
    TaskRun.objects.filter(pk=run.pk).update(state=TaskRun.State.PAUSED)
    body = expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    assert (body["paused"], body["run_state"]) == (True, "paused"), body


def test_status_reports_the_result_of_a_successful_task(api, run):
    current_app.backend.store_result(run.task_id, {"steps": 3}, "SUCCESS")
    try:
        body = expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    finally:
        current_app.backend.forget(run.task_id)
    assert (body["state"], body["result"]) == ("SUCCESS", {"steps": 3}), body


def test_status_of_a_task_known_only_by_a_signal_is_200_without_a_run(api):
    CeleryTaskSignal.objects.cancel("queued-elsewhere")
    body = expect(api.get("/api/tasks/queued-elsewhere/"), 200)
    assert (body["task"], body["run_state"]) == (None, None), body
    assert len(body["signals"]) == 1, body


def test_status_of_a_brief_task_known_only_to_celery_is_200(api):
    # A run that started and succeeded between two record writes leaves no run record.
    current_app.backend.store_result("brief-run", 7, "SUCCESS")
    try:
        body = expect(api.get("/api/tasks/brief-run/"), 200)
    finally:
        current_app.backend.forget("brief-run")
    assert (body["state"], body["result"], body["run_state"]) == ("SUCCESS", 7, None), body


def test_status_of_an_unknown_task_is_404(api):
    body = expect(api.get("/api/tasks/no-such-task/"), 404)
    assert "no-such-task" in body["error"], body


@pytest.mark.parametrize("task_id", ["x" * 256, "nul%00byte"])
def test_status_of_an_impossible_task_id_is_404(api, task_id):
    expect(api.get(f"/api/tasks/{task_id}/"), 404)


def test_status_answers_503_when_the_result_backend_is_down(api, run, monkeypatch):
    class Unreachable:
        @property
        def state(self):
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1")

    monkeypatch.setattr(current_app, "AsyncResult", lambda task_id: Unreachable())
    body = expect(api.get(f"/api/tasks/{run.task_id}/"), 503)
    assert "Redis" in body["error"], body


def test_status_answers_503_when_the_database_is_down(client, run):
    real_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = 1
    try:
        # Session auth would need the database too: send a token that cannot be checked.
        response = Api(client, "tsk_unverifiable").get(f"/api/tasks/{run.task_id}/")
    finally:
        connection.settings_dict["PORT"] = real_port
        connection.close()
    body = expect(response, 503)
    assert "PostgreSQL" in body["error"], body


# -- sending signals ------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["cancel", "pause", "resume"])
def test_signal_endpoint_answers_202_with_the_pending_signal(api, run, verb):
    body = expect(api.post(f"/api/tasks/{run.task_id}/{verb}/"), 202)
    row = CeleryTaskSignal.objects.get(task_id=run.task_id)
    assert body == {
        "id": row.pk,
        "task_id": run.task_id,
        "signal": f"{verb}_task",
        "message": "",
        "completed": False,
        "outcome": None,
        "created": row.created.isoformat(),
        "completed_at": None,
        "latency_ms": None,
        "already_pending": False,
        "already_stopped": False,
    }, body


@pytest.mark.parametrize("verb", ["cancel", "pause", "resume"])
def test_sending_the_same_signal_twice_says_it_was_already_pending(api, run, verb):
    first = expect(api.post(f"/api/tasks/{run.task_id}/{verb}/", {"message": "first"}), 202)
    second = expect(api.post(f"/api/tasks/{run.task_id}/{verb}/", {"message": "again"}), 202)
    assert second["already_pending"], f"a repeated {verb} did not say so: {second}"
    assert (second["id"], second["message"]) == (first["id"], "first"), second
    assert CeleryTaskSignal.objects.filter(task_id=run.task_id).count() == 1


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_a_cancel_of_a_finished_task_answers_at_once_that_it_came_too_late(api, run, state):
    TaskRun.objects.filter(pk=run.pk).update(state=state)
    body = expect(api.post(f"/api/tasks/{run.task_id}/cancel/"), 200)
    assert (body["completed"], body["outcome"]) == (True, "too_late"), body
    row = CeleryTaskSignal.objects.get(task_id=run.task_id)
    assert (row.completed, row.outcome) == (True, "too_late"), row


@pytest.mark.parametrize("state", ["running", "cancelled"])
def test_a_cancel_sent_again_after_one_stopped_the_task_answers_with_that_one(api, run, state):
    # The client's first answer was lost (a 503 during an outage): its retry must not learn
    # "too late" from a second row, whether or not the node wrote the run's end yet.
    first = CeleryTaskSignal.objects.cancel(run.task_id)
    first.mark_completed(Outcome.COOPERATIVE)
    TaskRun.objects.filter(pk=run.pk).update(state=state)
    body = expect(api.post(f"/api/tasks/{run.task_id}/cancel/?wait=1"), 200)
    assert (body["id"], body["outcome"], body["already_stopped"]) == (
        first.pk,
        Outcome.COOPERATIVE,
        True,
    ), f"the retried cancel did not answer with the one that stopped the task: {body}"
    assert CeleryTaskSignal.objects.filter(task_id=run.task_id).count() == 1, "a second row"


def test_cancel_with_a_wait_longer_than_allowed_is_cut_to_the_maximum(api, run, settings):
    settings.TASKSIGNAL_MAX_WAIT = 0.2
    started = time.monotonic()
    body = expect(api.post(f"/api/tasks/{run.task_id}/cancel/?wait=30"), 202)
    assert time.monotonic() - started < 5, "the wait was not capped by TASKSIGNAL_MAX_WAIT"
    assert body["completed"] is False, body


@pytest.mark.parametrize("wait", ["-1", "soon", "nan"])
def test_an_invalid_wait_is_400(api, run, wait):
    expect(api.post(f"/api/tasks/{run.task_id}/cancel/?wait={wait}"), 400)


def test_signal_accepts_the_empty_form_django_test_client_sends_for_no_body(client, superuser, run):
    headers = {"Authorization": f"Bearer {create_token(superuser)[1]}"}
    expect(client.post(f"/api/tasks/{run.task_id}/cancel/", headers=headers), 202)


def test_signal_records_the_message_and_the_user_who_sent_it(api, run, superuser):
    expect(api.post(f"/api/tasks/{run.task_id}/cancel/", {"message": "user pressed stop"}), 202)
    row = CeleryTaskSignal.objects.get(task_id=run.task_id)
    assert (row.message, row.requested_by) == ("user pressed stop", superuser), row


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ('{"message": 5}', "a message that is not a string"),
        ('{"message": "nul \\u0000"}', "a NUL character PostgreSQL cannot store"),
        ('{"message": "\\ud800"}', "a lone surrogate that is not UTF-8"),
        ('{"msg": "typo"}', "an unknown field"),
        ('"cancel"', "a JSON string instead of an object"),
    ],
)
def test_signal_rejects_a_malformed_body_with_400(api, run, raw, why):
    body = expect(api.post(f"/api/tasks/{run.task_id}/cancel/", raw=raw), 400)
    assert body["error"], f"400 for {why} has no message"
    assert not CeleryTaskSignal.objects.exists(), f"{why} still sent a signal"


def test_signal_to_an_unknown_task_is_404_and_sends_nothing(api):
    expect(api.post("/api/tasks/no-such-task/cancel/"), 404)
    assert not CeleryTaskSignal.objects.exists(), "a signal was sent to an unknown task"


def test_signals_endpoint_sends_a_registered_kind_by_name(api, run):
    body = expect(
        api.post(
            f"/api/tasks/{run.task_id}/signals/", {"signal": "append_message", "message": "m"}
        ),
        202,
    )
    assert body["signal"] == "append_message", body


def test_signals_endpoint_answers_400_naming_the_known_kinds_for_an_unknown_signal(api, run):
    body = expect(api.post(f"/api/tasks/{run.task_id}/signals/", {"signal": "explode"}), 400)
    assert "unknown signal 'explode'" in body["error"], body
    assert "cancel_task" in body["error"], f"the known kinds are not named: {body}"


# -- authentication and permissions ---------------------------------------------------------
def test_no_credentials_is_401_with_a_bearer_challenge(client, run):
    response = Api(client, None).get(f"/api/tasks/{run.task_id}/")
    expect(response, 401)
    assert response["WWW-Authenticate"] == "Bearer", response.headers


def test_an_unknown_token_is_401_invalid_token(client, run):
    response = Api(client, "tsk_not-a-real-token").get(f"/api/tasks/{run.task_id}/")
    expect(response, 401)
    assert response["WWW-Authenticate"] == 'Bearer error="invalid_token"', response.headers


def test_a_non_bearer_scheme_is_401(client, run):
    response = client.get(
        f"/api/tasks/{run.task_id}/", headers={"Authorization": "Basic cm9vdDpwdw=="}
    )
    expect(response, 401)


def test_the_token_of_an_inactive_user_is_401(client, superuser, run):
    secret = create_token(superuser)[1]
    User.objects.filter(pk=superuser.pk).update(is_active=False)
    expect(Api(client, secret).get(f"/api/tasks/{run.task_id}/"), 401)


def test_a_deleted_token_is_401(client, superuser, run):
    token, secret = create_token(superuser)
    token.delete()
    expect(Api(client, secret).get(f"/api/tasks/{run.task_id}/"), 401)


def test_a_token_seen_recently_costs_no_query_to_authenticate(
    client, superuser, run, django_assert_num_queries
):
    api = Api(client, create_token(superuser)[1])
    expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    with django_assert_num_queries(1):  # the status read only
        expect(api.get(f"/api/tasks/{run.task_id}/"), 200)


def test_a_token_deleted_after_use_stops_working_within_the_cache_time(
    client, superuser, run, settings
):
    settings.TASKSIGNAL_TOKEN_CACHE_SECONDS = 0.2
    token, secret = create_token(superuser)
    api = Api(client, secret)
    expect(api.get(f"/api/tasks/{run.task_id}/"), 200)
    token.delete()
    time.sleep(0.3)
    expect(api.get(f"/api/tasks/{run.task_id}/"), 401)


@pytest.mark.parametrize(
    ("method", "path", "permission"),
    [
        ("post", "/api/tasks/", "tasksignal.add_taskrun"),
        ("get", "/api/tasks/{id}/", "tasksignal.view_taskrun"),
        ("post", "/api/tasks/{id}/cancel/", "tasksignal.add_celerytasksignal"),
        ("post", "/api/tasks/{id}/pause/", "tasksignal.add_celerytasksignal"),
        ("post", "/api/tasks/{id}/resume/", "tasksignal.add_celerytasksignal"),
        ("post", "/api/tasks/{id}/signals/", "tasksignal.add_celerytasksignal"),
        ("get", "/api/tasks/", "tasksignal.view_taskrun"),
    ],
)
def test_a_user_without_the_permission_gets_403_naming_it(client, run, method, path, permission):
    api = Api(client, create_token(user_with("view_celerytasksignal"))[1])
    response = getattr(api, method)(path.replace("{id}", run.task_id))
    body = expect(response, 403)
    assert permission in body["error"], body
    assert not CeleryTaskSignal.objects.exists(), "a user without permission sent a signal"


def test_a_user_with_only_the_needed_permission_may_cancel(client, run):
    api = Api(client, create_token(user_with("add_celerytasksignal"))[1])
    expect(api.post(f"/api/tasks/{run.task_id}/cancel/"), 202)


def test_a_user_with_only_the_view_permission_may_read(client, run):
    api = Api(client, create_token(user_with("view_taskrun"))[1])
    expect(api.get(f"/api/tasks/{run.task_id}/"), 200)


def test_a_logged_in_session_may_read(client, superuser, run):
    client.force_login(superuser)
    expect(client.get(f"/api/tasks/{run.task_id}/"), 200)


def test_a_session_post_without_the_csrf_token_is_403(superuser, run):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(superuser)
    body = expect(Api(client, None).post(f"/api/tasks/{run.task_id}/cancel/"), 403)
    assert "CSRF" in body["error"], body


def test_a_session_post_with_the_csrf_token_is_accepted(superuser, run):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(superuser)
    client.get("/admin/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    response = Api(client, None).post(
        f"/api/tasks/{run.task_id}/cancel/", headers={"X-CSRFToken": token}
    )
    expect(response, 202)


def test_a_token_post_needs_no_csrf_token(superuser, run):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    expect(Api(client, create_token(superuser)[1]).post(f"/api/tasks/{run.task_id}/cancel/"), 202)


def test_a_bad_token_is_not_rescued_by_a_valid_session(client, superuser, run):
    client.force_login(superuser)
    expect(Api(client, "tsk_wrong").get(f"/api/tasks/{run.task_id}/"), 401)


# -- tokens ---------------------------------------------------------------------------------
def test_tokens_are_stored_as_the_sha256_of_the_secret_only(superuser):
    token, secret = create_token(superuser, "ci")
    row = ApiToken.objects.filter(pk=token.pk).values().get()
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest(), row
    leaked = [name for name, value in row.items() if isinstance(value, str) and secret in value]
    assert not leaked, f"the plaintext secret is stored in {leaked}"
    assert secret.startswith(row["prefix"]), f"prefix {row['prefix']} does not start the secret"
    assert len(row["prefix"]) < len(secret) // 2, f"prefix {row['prefix']} gives half away"


def test_create_api_token_prints_a_token_that_authenticates(client, superuser, run, capsys):
    call_command("create_api_token", "root", "--name", "deploy")
    secret = capsys.readouterr().out.strip()
    assert ApiToken.objects.get(user=superuser).name == "deploy"
    expect(Api(client, secret).get(f"/api/tasks/{run.task_id}/"), 200)


def test_create_api_token_for_an_unknown_user_is_a_clear_error():
    with pytest.raises(CommandError, match="no user 'ghost'"):
        call_command("create_api_token", "ghost")


# -- methods and paths ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("delete", "/api/tasks/", "GET, POST"),
        ("delete", "/api/tasks/{id}/", "GET"),
        ("get", "/api/tasks/{id}/cancel/", "POST"),
        ("put", "/api/openapi.json", "GET"),
    ],
)
def test_a_wrong_method_is_405_with_allow(api, run, method, path, allow):
    response = getattr(api.client, method)(path.replace("{id}", run.task_id), headers=api.headers)
    expect(response, 405)
    assert response["Allow"] == allow, response.headers


@pytest.mark.parametrize("path", ["/api/", "/api/nope", "/api/tasks/x/cancel", "/api/tasks//"])
def test_an_unknown_path_under_the_api_is_a_json_404(api, path):
    expect(api.get(path), 404)


def test_a_query_parameter_given_twice_is_400(api, run):
    body = expect(api.get("/api/tasks/?state=running&state=queued"), 400)
    assert "state" in body["error"], body


def test_a_waiting_cancel_answers_503_at_once_when_the_database_is_down(client, run):
    real_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = 1
    started = time.monotonic()
    try:
        response = Api(client, "tsk_unverifiable").post(f"/api/tasks/{run.task_id}/cancel/?wait=60")
    finally:
        connection.settings_dict["PORT"] = real_port
        connection.close()
    expect(response, 503)
    assert time.monotonic() - started < 5, "a 503 that waited"


def test_runs_are_listed_newest_first_a_page_at_a_time(api):
    ids = [
        TaskRun.objects.create(task_id=f"listed-{n}", task_name="t", state="running").task_id
        for n in range(5)
    ]
    first = expect(api.get("/api/tasks/?limit=3"), 200)
    assert [r["id"] for r in first["results"]] == ids[:-4:-1], first
    second = expect(api.get(first["next"]), 200)
    assert [r["id"] for r in second["results"]] == ids[1::-1], second
    assert second["next"] is None, second


def test_runs_are_listed_by_state_task_and_worker(api):
    TaskRun.objects.create(task_id="a", task_name="t1", state="running", worker="w1")
    TaskRun.objects.create(task_id="b", task_name="t2", state="succeeded", worker="w2")
    for query, expected in (("state=running", ["a"]), ("task=t2", ["b"]), ("worker=w2", ["b"])):
        body = expect(api.get(f"/api/tasks/?{query}"), 200)
        assert [r["id"] for r in body["results"]] == expected, (query, body)


def test_a_query_parameter_without_a_name_is_a_400(api):
    body = expect(api.get("/api/tasks/?=false"), 400)
    assert body["error"] == "a query parameter has no name", body
