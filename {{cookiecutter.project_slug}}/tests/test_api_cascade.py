"""The API's cascades and filter cancels: what they answer and write, and who may send them."""

import uuid

import pytest
from django.contrib.auth.models import User

from tasksignal.auth import create_token
from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import RunState
from tests.test_api import Api, expect, user_with

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(client) -> Api:
    """The API as a superuser, through a bearer token."""
    return Api(client, create_token(User.objects.create_superuser("root"), "tests")[1])


@pytest.fixture
def run() -> TaskRun:
    """A running task with a run record."""
    return TaskRun.objects.create(task_id=str(uuid.uuid4()), task_name="j", state=RunState.RUNNING)


@pytest.mark.parametrize("verb", ["cancel", "pause", "resume"])
def test_cascade_reaches_the_recorded_descendants_and_says_how_many(api, run, verb):
    TaskLineage.objects.create(task_id="child", ancestors=[run.task_id])
    TaskLineage.objects.create(task_id="grandchild", ancestors=[run.task_id, "child"])
    body = expect(api.post(f"/api/tasks/{run.task_id}/{verb}/?cascade=true"), 202)
    assert (body["reached"], body["still_to_stop"]) == (3, 3), body
    rows = CeleryTaskSignal.objects.filter(task_id__in=["child", "grandchild"], cascade=True)
    assert rows.count() == 2, f"the descendants got {rows.count()} {verb} rows, not 2"


def test_without_cascade_only_the_task_itself_is_signalled(api, run):
    TaskLineage.objects.create(task_id="child", ancestors=[run.task_id])
    body = expect(api.post(f"/api/tasks/{run.task_id}/cancel/"), 202)
    assert "reached" not in body, body
    assert not CeleryTaskSignal.objects.filter(task_id="child").exists(), "the child was cancelled"


def test_cascade_to_a_group_id_with_no_run_of_its_own_is_accepted(api):
    group_id = str(uuid.uuid4())
    TaskLineage.objects.create(task_id="member", ancestors=[group_id])
    body = expect(api.post(f"/api/tasks/{group_id}/cancel/?cascade=true"), 202)
    assert body["reached"] == 2, body


def test_filter_cancel_cancels_the_matching_runs_only(api):
    for task_id, name, state in [
        ("a", "demo.job", RunState.RUNNING),
        ("b", "demo.job", RunState.QUEUED),
        ("c", "demo.other", RunState.RUNNING),
        ("d", "demo.job", RunState.SUCCEEDED),
    ]:
        TaskRun.objects.create(task_id=task_id, task_name=name, state=state)
    body = expect(api.post("/api/cancels/", {"task": "demo.job"}), 200)
    assert body == {"matched": 2, "reached": 2, "still_to_stop": 2}, body
    cancelled = set(
        CeleryTaskSignal.objects.filter(signal=CANCEL_TASK).values_list("task_id", flat=True)
    )
    assert cancelled == {"a", "b"}, f"cancelled {cancelled}, not the unfinished demo.job runs"


def test_filter_cancel_with_no_criterion_is_a_400(api, run):
    body = expect(api.post("/api/cancels/", {"cascade": True}), 400)
    assert "at least one of" in body["error"], body
    assert not CeleryTaskSignal.objects.exists(), "a filter cancel without a filter cancelled"


def test_filter_cancel_with_a_bad_age_is_a_400(api):
    body = expect(api.post("/api/cancels/", {"older_than": "soon"}), 400)
    assert "older_than" in body["error"], body


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/cancels/", {"task": "demo.job"}),
        ("post", "/api/tasks/{task_id}/cancel/?cascade=true", None),
    ],
)
def test_a_user_without_the_signal_permission_gets_403(client, run, method, path, body):
    user = user_with("view_taskrun")
    response = getattr(Api(client, create_token(user, "t")[1]), method)(
        path.format(task_id=run.task_id), body
    )
    answer = expect(response, 403)
    assert "tasksignal.add_celerytasksignal" in answer["error"], answer
    assert not CeleryTaskSignal.objects.exists(), "a refused request wrote a signal"


def test_a_user_with_the_signal_permission_may_cancel_by_filter(client, run):
    user = user_with("add_celerytasksignal")
    response = Api(client, create_token(user, "t")[1]).post("/api/cancels/", {"state": "running"})
    assert expect(response, 200)["matched"] == 1
