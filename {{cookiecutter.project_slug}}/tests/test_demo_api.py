"""The JSON API end to end: a real worker runs a demo task started and cancelled over HTTP."""

from datetime import datetime

import pytest

from tasksignal.auth import create_token
from tasksignal.models import TaskRun
from tests.conftest import wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def headers(django_user_model) -> dict[str, str]:
    """Bearer headers of a superuser's token."""
    user = django_user_model.objects.create_superuser("demo-api", "demo@example.com", "pw")
    return {"Authorization": f"Bearer {create_token(user)[1]}"}


def status(client, headers, task_id: str) -> dict:
    """``GET /api/tasks/<id>/``, asserting it answers 200."""
    response = client.get(f"/api/tasks/{task_id}/", headers=headers)
    assert response.status_code == 200, f"status of {task_id}: {response.content!r}"
    return response.json()


def start_running(client, headers, task: str, kwargs: dict) -> str:
    """Start ``task`` through the API; return its id once the worker records it running."""
    response = client.post(
        "/api/tasks/",
        {"task": task, "kwargs": kwargs},
        content_type="application/json",
        headers=headers,
    )
    assert response.status_code == 202, f"start: {response.content!r}"
    task_id = response.json()["id"]
    wait_for(
        lambda: status(client, headers, task_id)["run_state"] == "running",
        15,
        f"the worker to record {task_id} as running",
    )
    return task_id


def test_a_job_started_and_cancelled_through_the_api_stops_cooperatively(worker, client, headers):
    task_id = start_running(
        client, headers, "demo.tasks.cooperative_job", {"steps": 600, "step_seconds": 0.05}
    )

    response = client.post(f"/api/tasks/{task_id}/cancel/", headers=headers)
    assert response.status_code == 202, f"cancel: {response.content!r}"

    final = wait_for(
        lambda: (
            (body := status(client, headers, task_id))["state"] == "REVOKED"
            and body["stopped_at"]
            and body
        ),
        15,
        f"task {task_id} to be REVOKED with its cancel completed",
    )
    assert final["outcome"] == "cooperative", f"expected a cooperative stop: {final}"
    assert 0 <= final["latency_ms"] < 5000, f"implausible cancel latency: {final}"
    requested = datetime.fromisoformat(final["cancel_requested_at"])
    stopped = datetime.fromisoformat(final["stopped_at"])
    expected_ms = (stopped - requested).total_seconds() * 1000
    assert final["latency_ms"] == pytest.approx(expected_ms, abs=0.01), final


BASELINE = "/loadtest/tasks/{id}/revoke/"


def test_the_revoke_baseline_is_not_mounted_by_the_project(client, headers):
    response = client.post(BASELINE.format(id="any"), headers=headers)
    assert response.status_code == 404, "the production URLconf mounts the revoke baseline"


def test_the_revoke_baseline_needs_the_signal_permission(client, settings, django_user_model):
    settings.ROOT_URLCONF = "loadtest.baseline"
    user = django_user_model.objects.create_user("reader")
    response = client.post(
        BASELINE.format(id="any"), headers={"Authorization": f"Bearer {create_token(user)[1]}"}
    )
    assert response.status_code == 403, response.content


def test_the_revoke_baseline_kills_the_process_running_the_task(worker, client, headers, settings):
    settings.ROOT_URLCONF = "loadtest.baseline"
    task_id = start_running(client, headers, "demo.tasks.sleepy_job", {"seconds": 60})
    pid = TaskRun.objects.get(task_id=task_id).pid
    assert pid in worker.child_pids(), f"run record names pid {pid}, not a worker child"

    response = client.post(BASELINE.format(id=task_id), headers=headers)
    assert response.status_code == 202, f"revoke: {response.content!r}"
    assert response.json()["revoked_at"], response.json()

    wait_for(lambda: pid not in worker.child_pids(), 15, f"child {pid} to be killed")
    assert status(client, headers, task_id)["state"] == "REVOKED"


def test_a_plain_task_started_through_the_api_is_recorded_as_it_ends(worker, client, headers):
    response = client.post(
        "/api/tasks/",
        {"task": "demo.tasks.add", "kwargs": {"x": 2, "y": 3}},
        content_type="application/json",
        headers=headers,
    )
    task_id = response.json()["id"]
    wait_for(
        lambda: status(client, headers, task_id)["run_state"] == "succeeded",
        10,
        "the plain task's record to say succeeded, not queued",
    )
    assert status(client, headers, task_id)["result"] == 5
