"""The demo's workflow and reports: a whole chord cancelled through the API, a report's
work stopped when the report goes (a real worker)."""

import pytest
from celery import states
from celery.result import AsyncResult

from demo.models import Report
from tasksignal.auth import create_token
from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun
from tasksignal.states import Outcome, RunState
from tests.conftest import wait_for
from tests.test_cascade import wait_all_stopped

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def headers(admin_user) -> dict[str, str]:
    """Bearer headers of a superuser's token (pytest-django's ``admin_user``)."""
    return {"Authorization": f"Bearer {create_token(admin_user)[1]}"}


def test_a_workflow_cancelled_with_cascade_stops_every_job_and_never_runs_its_callback(
    worker, client, headers
):
    kwargs = {"jobs": 3, "steps": 600, "step_seconds": 0.05}
    started = client.post(
        "/api/tasks/",
        {"task": "demo.tasks.workflow", "kwargs": kwargs},
        content_type="application/json",
        headers=headers,
    )
    assert started.status_code == 202, f"start: {started.content!r}"
    workflow_id = started.json()["id"]
    started = AsyncResult(workflow_id).get(timeout=15)
    callback = AsyncResult(started["callback"])
    jobs = TaskRun.objects.filter(task_id__in=started["jobs"], state=RunState.RUNNING)
    wait_for(lambda: jobs.count() == 3, 15, "the workflow's three jobs to run")
    response = client.post(f"/api/tasks/{workflow_id}/cancel/?cascade=true", headers=headers)
    assert response.status_code == 200, response.content  # the workflow task itself is done
    body = response.json()
    assert (body["reached"], body["still_to_stop"]) == (5, 4), f"jobs and callback: {body}"
    wait_all_stopped(jobs.values_list("task_id", flat=True))
    # Stored as the last job's stop is announced, just after its cancel is completed.
    wait_for(lambda: callback.state == states.REVOKED, 5, "the callback's result: REVOKED")
    assert not TaskRun.objects.filter(task_name="demo.tasks.summarize").exists(), "it ran"
    assert TaskLineage.objects.filter(task_id=callback.id).exists()


def test_deleting_a_report_stops_the_task_rendering_it(worker):
    report = Report.objects.create(title="Q3", pages=600)
    task_id = report.render()
    runs = TaskRun.objects.filter(task_id=task_id, state=RunState.RUNNING)
    wait_for(runs.exists, 15, "the report's rendering to run")
    report.delete()
    assert wait_all_stopped([task_id]) == {task_id: Outcome.COOPERATIVE}
    assert CeleryTaskSignal.objects.get(task_id=task_id).cascade, "not cancelled by subject"
