"""The admin an operator runs the service from, through Django's test client.

Each page, button and action, with the permission it needs; what the list shows of each
run; and what a page costs in queries on a list of 1,000 runs. The same pages driven by a
real browser against a real server and worker are in ``test_admin_browser.py``.
"""

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tasksignal.admin import TaskRunAdmin, send_to_runs, signal_run
from tasksignal.admin_filters import distinct_values
from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Outcome, RunState, Source
from tests import tasks
from tests.conftest import wait_for, wait_until_completed

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:tasksignal_taskrun_changelist"
LIVE = "admin:tasksignal_taskrun_live"
START = "admin:tasksignal_taskrun_start"
CANCEL_MATCHING = "admin:tasksignal_taskrun_cancel_matching"
SIGNAL_ADD = "admin:tasksignal_celerytasksignal_add"
JSON = {"HTTP_ACCEPT": "application/json"}


def make_run(task_id: str, state: str = RunState.RUNNING, **fields) -> TaskRun:
    started = fields.pop("started_at", timezone.now() - timedelta(seconds=3))
    defaults = {"task_name": "tests.tasks.count_with_checkpoints", "worker": "w1@host"}
    return TaskRun.objects.create(
        task_id=task_id, state=state, started_at=started, pid=4242, **{**defaults, **fields}
    )


def completed_cancel(task_id: str, outcome: str, latency_ms: float) -> CeleryTaskSignal:
    now = timezone.now()
    return CeleryTaskSignal.objects.create(
        task_id=task_id,
        signal=CeleryTaskSignal.CANCEL_TASK,
        completed=True,
        outcome=outcome,
        created=now - timedelta(milliseconds=latency_ms),
        modified=now,
        acknowledged_at=now,
        completed_at=now,
    )


@pytest.fixture
def runs():
    return [make_run(f"run-{n}") for n in range(3)]


def stop_and_wait_for_the_record(task_id: str) -> None:
    """Cancel ``task_id`` and wait until the worker has recorded its end: a record written
    after this test's database flush would be a stray row in the next tests."""
    CeleryTaskSignal.objects.cancel(task_id)
    finished = TaskRun.objects.filter(task_id=task_id, state__in=RunState.FINISHED)
    wait_for(finished.exists, 15, f"the worker to record the end of {task_id}")


def staff_user(*permissions: str, username: str = "staff") -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in ("view_taskrun", "view_celerytasksignal", *permissions):
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def run_action(client, action: str, runs, **extra):
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [run.pk for run in runs], **extra},
        follow=True,
    )


def signal_url(run: TaskRun, verb: str) -> str:
    return reverse("admin:tasksignal_taskrun_signal", args=[run.pk, verb])


def annotated(run: TaskRun) -> TaskRun:
    return TaskRun.objects.with_signal_facts().get(pk=run.pk)


def row_html(html: str, task_id: str) -> str:
    """The ``<tr>`` of the changelist that shows ``task_id``."""
    for row in re.findall(r"<tr[^>]*>.*?</tr>", html, re.S):
        if f">{task_id}<" in row:
            return row
    raise AssertionError(f"no row shows {task_id}")


def buttons(html: str) -> dict[str, bool]:
    """``{verb: enabled}`` for the signal buttons in ``html``."""
    found = {}
    for verb, attributes in re.findall(r"<button[^>]*ts-button-(\w+)([^>]*)>", html):
        found[verb] = " disabled" not in attributes
    return found


# -- the list ---------------------------------------------------------------------------------
def test_the_list_shows_state_outcome_progress_timing_latency_worker_and_pid(admin_client):
    make_run("shown", progress_current=42, progress_total=100, progress_message="step 42")
    make_run(
        "stopped",
        state=RunState.CANCELLED,
        finished_at=timezone.now(),
        started_at=timezone.now() - timedelta(seconds=12.5),
    )
    completed_cancel("stopped", Outcome.INTERRUPTED, 812.5)
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    row = row_html(html, "shown")
    assert 'value="42"' in row, f"no progress bar at 42%: {row}"
    assert "step 42" in row, f"no progress message: {row}"
    assert re.search(r">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d<", row), f"no start to the second: {row}"
    assert "so far" in row, "a running run shows no duration so far"
    assert "w1@host" in row, f"worker missing: {row}"
    assert ">4242<" in row, f"pid missing: {row}"
    row = row_html(html, "stopped")
    assert "Cancelled" in row, f"state missing: {row}"
    assert "interrupted" in row, f"outcome missing: {row}"
    assert "812.5 ms" in row, f"the cancel latency is not shown: {row}"
    assert "12.5 s" in row, f"the duration is not shown: {row}"


def test_a_run_whose_cancel_stopped_it_shows_cancelled_even_before_its_record_says_so(
    admin_client,
):
    make_run("lagging")  # the worker has not written the end yet
    completed_cancel("lagging", Outcome.COOPERATIVE, 20)
    row = row_html(admin_client.get(reverse(CHANGELIST)).content.decode(), "lagging")
    assert "Running" not in row, f"a stopped run shows running: {row}"
    assert "Cancelled" in row, f"a stopped run does not show cancelled: {row}"
    assert buttons(row) == {"cancel": False, "pause": False, "resume": False}, buttons(row)


@pytest.mark.parametrize(
    ("state", "pending", "expected"),
    [
        (RunState.QUEUED, [], {"cancel": True, "pause": True, "resume": False}),
        (RunState.RUNNING, [], {"cancel": True, "pause": True, "resume": False}),
        (RunState.RUNNING, ["pause_task"], {"cancel": True, "pause": False, "resume": True}),
        (RunState.RUNNING, ["cancel_task"], {"cancel": False, "pause": True, "resume": False}),
        (RunState.PAUSED, [], {"cancel": True, "pause": False, "resume": True}),
        (RunState.SUCCEEDED, [], {"cancel": False, "pause": False, "resume": False}),
        (RunState.FAILED, [], {"cancel": False, "pause": False, "resume": False}),
    ],
)
def test_row_buttons_are_disabled_where_the_state_forbids_them(
    admin_client, state, pending, expected
):
    make_run("buttons", state=state)
    for kind in pending:
        CeleryTaskSignal.objects.send("buttons", kind)
    row = row_html(admin_client.get(reverse(CHANGELIST)).content.decode(), "buttons")
    assert buttons(row) == expected, f"{state} with {pending} pending: {buttons(row)}"


def test_a_user_who_may_not_signal_sees_no_buttons(client, runs):
    client.force_login(staff_user())
    html = client.get(reverse(CHANGELIST)).content.decode()
    assert "ts-button" not in html, "buttons shown to a user without the send permission"
    assert "Cancel every unfinished run" not in html, "bulk cancel offered without permission"


def test_the_list_has_filters_by_state_outcome_task_worker_and_age(admin_client):
    make_run("a", task_name="tasks.alpha", worker="w1@host")
    make_run("b", task_name="tasks.beta", worker="w2@host")
    make_run("old", task_name="tasks.alpha", started_at=timezone.now() - timedelta(days=9))
    completed_cancel("b", Outcome.KILLED, 5000)
    cases = {
        "state__exact=running": {"a", "b", "old"},
        "outcome=killed": {"b"},
        "outcome=none": {"a", "old"},
        "task=tasks.alpha": {"a", "old"},
        "worker=w2@host": {"b"},
        "age=1h": {"a", "b"},
        "age=older": {"old"},
    }
    for query, expected in cases.items():
        response = admin_client.get(f"{reverse(CHANGELIST)}?{query}")
        shown = {run.task_id for run in response.context["cl"].result_list}
        assert shown == expected, f"?{query} listed {shown}"


def test_task_and_worker_filters_list_each_value_once_by_skip_scan():
    for n in range(30):
        make_run(f"r{n}", task_name=f"tasks.t{n % 3}", worker=f"w{n % 2}@host")
    make_run("queued", state=RunState.QUEUED, task_name="tasks.t0", worker="")
    assert distinct_values("task_name") == ["tasks.t0", "tasks.t1", "tasks.t2"]
    assert distinct_values("worker") == ["w0@host", "w1@host"], "an empty worker is listed"


def test_the_list_of_a_thousand_runs_costs_as_many_queries_as_a_list_of_ten(
    admin_client, monkeypatch
):
    def queries_for_the_list() -> tuple[int, int]:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(reverse(CHANGELIST))
        assert response.status_code == 200
        return len(captured), len(response.context["cl"].result_list)

    monkeypatch.setattr(TaskRunAdmin, "list_per_page", 1000)
    _bulk_runs(10)
    few, shown = queries_for_the_list()
    assert shown == 10
    _bulk_runs(990, start=10)
    many, shown = queries_for_the_list()
    assert shown == 1000, f"the page shows {shown} runs"
    assert many == few, f"{few} queries for 10 runs but {many} for 1,000: a query per row"
    # Session, user, the page, its count, the filters' values and the newest run's id.
    assert many <= 9, f"{many} queries for one page of the list"


def _bulk_runs(count: int, start: int = 0) -> None:
    now = timezone.now()
    TaskRun.objects.bulk_create(
        TaskRun(
            task_id=f"bulk-{n}",
            task_name=f"tasks.t{n % 5}",
            state=RunState.CANCELLED if n % 2 else RunState.RUNNING,
            worker=f"w{n % 3}@host",
            pid=1000 + n,
            started_at=now - timedelta(seconds=n),
            progress_current=n % 100,
            progress_total=100,
        )
        for n in range(start, start + count)
    )
    CeleryTaskSignal.objects.bulk_create(
        CeleryTaskSignal(
            task_id=f"bulk-{n}",
            signal=CeleryTaskSignal.CANCEL_TASK,
            completed=True,
            outcome=Outcome.COOPERATIVE,
            created=now,
            modified=now,
            completed_at=now,
        )
        for n in range(start, start + count, 2)
    )


# -- live updates -----------------------------------------------------------------------------
def test_the_live_view_answers_the_cells_of_the_runs_asked_for(admin_client, runs):
    TaskRun.objects.filter(pk=runs[0].pk).update(progress_current=3, progress_total=4)
    ids = ",".join(str(run.pk) for run in runs[:2])
    body = admin_client.get(f"{reverse(LIVE)}?ids={ids}").json()
    assert set(body["runs"]) == {str(runs[0].pk), str(runs[1].pk)}, body["runs"].keys()
    first = body["runs"][str(runs[0].pk)]
    assert first["live"] is True
    assert 'value="75"' in first["cells"]["progress_display"], first["cells"]
    assert "ts-button-cancel" in first["cells"]["row_actions"], "no buttons in the live cells"
    assert body["newest"] == runs[-1].pk, "the newest run's id is not reported"


def test_a_poll_costs_the_same_queries_for_one_run_as_for_fifty(admin_client):
    _bulk_runs(50)
    ids = list(TaskRun.objects.values_list("pk", flat=True))

    def queries(count: int) -> int:
        query = ",".join(str(pk) for pk in ids[:count])
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(f"{reverse(LIVE)}?ids={query}").status_code == 200
        return len(captured)

    one, fifty = queries(1), queries(50)
    assert one == fifty, f"a poll of 1 run costs {one} queries, of 50 runs {fifty}"
    assert fifty <= 4, f"a poll costs {fifty} queries (session, user, runs, newest)"


def test_a_finished_run_is_not_live_and_a_user_who_may_not_signal_gets_no_buttons(client):
    client.force_login(staff_user())
    run = make_run("done", state=RunState.SUCCEEDED, finished_at=timezone.now())
    body = client.get(f"{reverse(LIVE)}?ids={run.pk}").json()
    answer = body["runs"][str(run.pk)]
    assert answer["live"] is False, "a succeeded run is reported live"
    assert "row_actions" not in answer["cells"], "buttons sent to a user who may not signal"


def test_the_live_view_needs_the_view_permission(client, runs):
    client.force_login(User.objects.create_user("nobody", password="pw", is_staff=True))
    response = client.get(f"{reverse(LIVE)}?ids={runs[0].pk}")
    assert response.status_code == 403, response.status_code


def test_the_live_view_refuses_ids_that_are_not_numbers(admin_client):
    assert admin_client.get(f"{reverse(LIVE)}?ids=1,x").status_code == 400


# -- a row's buttons --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("verb", "kind"),
    [("cancel", "cancel_task"), ("pause", "pause_task")],
)
def test_a_row_button_sends_its_signal_from_the_admin_as_the_user(admin_client, runs, verb, kind):
    response = admin_client.post(signal_url(runs[0], verb), **JSON)
    assert response.status_code == 200, response.content
    assert response.json()["level"] == "success", response.json()
    signal = CeleryTaskSignal.objects.get(task_id=runs[0].task_id)
    assert signal.signal == kind
    assert signal.source == Source.ADMIN, f"source recorded as {signal.source!r}"
    assert signal.requested_by.username == "admin", "the sender was not recorded"


def test_resume_is_sent_to_a_paused_run(admin_client):
    run = make_run("paused", state=RunState.PAUSED)
    assert admin_client.post(signal_url(run, "resume"), **JSON).status_code == 200
    assert CeleryTaskSignal.objects.pending("paused", "resume_task").exists()


def test_a_row_button_without_javascript_posts_and_comes_back_to_the_filtered_list(
    admin_client, runs
):
    back = f"{reverse(CHANGELIST)}?state__exact=running"
    response = admin_client.post(signal_url(runs[0], "cancel"), {"next": back})
    assert response.status_code == 302, response.status_code
    assert response["Location"] == back, response["Location"]
    message = [str(m) for m in response.wsgi_request._messages]
    assert any("Sent a cancel" in text for text in message), message


def test_a_row_button_never_redirects_to_another_site(admin_client, runs):
    response = admin_client.post(signal_url(runs[0], "cancel"), {"next": "https://evil.example/"})
    assert response["Location"] == reverse(CHANGELIST), response["Location"]


def test_a_second_press_says_the_signal_was_already_pending(admin_client, runs):
    admin_client.post(signal_url(runs[0], "cancel"), **JSON)
    response = admin_client.post(signal_url(runs[0], "cancel"), **JSON)
    assert response.status_code == 409, response.status_code
    assert "already pending" in response.json()["message"], response.json()


def test_a_finished_run_is_sent_nothing(admin_client):
    run = make_run("over", state=RunState.SUCCEEDED, finished_at=timezone.now())
    response = admin_client.post(signal_url(run, "cancel"), **JSON)
    assert response.status_code == 409
    assert "succeeded" in response.json()["message"], response.json()
    assert not CeleryTaskSignal.objects.exists(), "a finished run was signalled"


def test_a_row_button_needs_the_send_permission(client, runs):
    client.force_login(staff_user())
    response = client.post(signal_url(runs[0], "cancel"), **JSON)
    assert response.status_code == 403, response.status_code
    assert not CeleryTaskSignal.objects.exists(), "a user without permission sent a signal"


def test_a_row_button_needs_a_post_with_the_csrf_token(runs):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_superuser("csrf", password="pw"))
    assert client.get(signal_url(runs[0], "cancel")).status_code == 405
    assert client.post(signal_url(runs[0], "cancel")).status_code == 403
    assert not CeleryTaskSignal.objects.exists(), "a signal was sent without the CSRF token"


def test_signal_run_refuses_what_the_state_forbids_without_a_request(runs):
    user = User.objects.create_user("helper")
    _level, message = signal_run(annotated(runs[0]), "resume_task", user)
    assert "cannot be sent a resume" in message, message
    assert not CeleryTaskSignal.objects.exists()


# -- actions and the bulk cancel --------------------------------------------------------------
def test_cancel_selected_asks_first_showing_how_many_unfinished_runs_it_would_cancel(
    admin_client, runs
):
    TaskRun.objects.filter(pk=runs[0].pk).update(state=RunState.SUCCEEDED)
    response = run_action(admin_client, "cancel_selected", runs)
    html = response.content.decode()
    assert "Cancel <strong>2</strong> unfinished runs" in html, html[:2000]
    assert not CeleryTaskSignal.objects.exists(), "the confirmation page sent cancels"
    run_action(admin_client, "cancel_selected", runs, post="yes")
    pending = set(CeleryTaskSignal.objects.pending(signal="cancel_task").values_list("task_id"))
    assert pending == {("run-1",), ("run-2",)}, f"cancels pending for {pending}"


def test_cancel_selected_across_every_page_of_a_filtered_list(admin_client, runs):
    make_run("other", task_name="tasks.other")
    url = f"{reverse(CHANGELIST)}?task=tests.tasks.count_with_checkpoints"
    data = {"action": "cancel_selected", "_selected_action": [runs[0].pk], "select_across": "1"}
    response = admin_client.post(url, data)
    assert "Cancel <strong>3</strong>" in response.content.decode(), "wrong count across pages"
    admin_client.post(url, {**data, "post": "yes"})
    assert not CeleryTaskSignal.objects.filter(task_id="other").exists(), "filter not applied"
    assert CeleryTaskSignal.objects.count() == 3


def test_cancel_every_unfinished_run_matching_the_filters_after_confirming(admin_client, runs):
    make_run("other", task_name="tasks.other")
    make_run("done", state=RunState.SUCCEEDED, finished_at=timezone.now())
    url = f"{reverse(CANCEL_MATCHING)}?task=tests.tasks.count_with_checkpoints"
    html = admin_client.get(url).content.decode()
    assert "Cancel <strong>3</strong> unfinished runs matching this list" in html, html[:3000]
    assert "task=tests.tasks.count_with_checkpoints" in html, "the filter is not shown"
    assert not CeleryTaskSignal.objects.exists(), "the confirmation page sent cancels"
    response = admin_client.post(url)
    assert response.status_code == 302
    assert response["Location"].endswith("?task=tests.tasks.count_with_checkpoints")
    cancelled = set(CeleryTaskSignal.objects.values_list("task_id", flat=True))
    assert cancelled == {"run-0", "run-1", "run-2"}, cancelled
    assert set(CeleryTaskSignal.objects.values_list("source", flat=True)) == {Source.ADMIN}


def test_the_bulk_cancel_needs_the_send_permission(client, runs):
    client.force_login(staff_user())
    assert client.get(reverse(CANCEL_MATCHING)).status_code == 403
    assert client.post(reverse(CANCEL_MATCHING)).status_code == 403
    run_action(client, "cancel_selected", runs, post="yes")
    assert not CeleryTaskSignal.objects.exists(), "a user without permission sent cancels"


def test_pause_and_resume_actions_send_their_signals(admin_client, runs):
    run_action(admin_client, "pause_selected", runs[:1])
    run_action(admin_client, "resume_selected", runs[:1])
    kinds = sorted(CeleryTaskSignal.objects.values_list("signal", flat=True))
    assert kinds == ["pause_task", "resume_task"], kinds


def test_a_user_with_the_send_permission_may_use_the_actions(client, runs):
    client.force_login(staff_user("add_celerytasksignal"))
    run_action(client, "pause_selected", runs)
    assert CeleryTaskSignal.objects.count() == 3


def test_send_to_runs_skips_finished_runs(runs):
    TaskRun.objects.filter(pk=runs[0].pk).update(state=RunState.FAILED)
    count = send_to_runs(TaskRun.objects.all(), "cancel_task", None)
    assert count == 2, count
    assert not CeleryTaskSignal.objects.filter(task_id="run-0").exists()


# -- deleting ---------------------------------------------------------------------------------
def test_a_running_run_cannot_be_deleted(admin_client, runs):
    url = reverse("admin:tasksignal_taskrun_delete", args=[runs[0].pk])
    assert admin_client.get(url).status_code == 403
    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert TaskRun.objects.filter(pk=runs[0].pk).exists(), "a running run was deleted"


def test_bulk_delete_removes_only_finished_runs(admin_client, runs):
    TaskRun.objects.filter(pk=runs[0].pk).update(state=RunState.SUCCEEDED)
    changelist = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert 'value="delete_selected"' not in changelist, "Django's delete of any run is offered"
    response = run_action(admin_client, "delete_finished", runs)
    assert "Deleted 1 finished run. Kept 2 unfinished runs." in response.content.decode()
    assert set(TaskRun.objects.values_list("task_id", flat=True)) == {"run-1", "run-2"}


# -- a run's page -----------------------------------------------------------------------------
def test_a_run_page_is_read_only_with_an_honest_title(admin_client, runs):
    html = admin_client.get(
        reverse("admin:tasksignal_taskrun_change", args=[runs[0].pk])
    ).content.decode()
    assert "<h1>Task run run-0</h1>" in html, re.findall(r"<h1>.*?</h1>", html)
    assert 'name="_save"' not in html, "a Save button is shown"
    assert "Save and continue" not in html, "a Save and continue button is shown"
    assert "Change task run" not in html


def test_a_run_page_tells_the_story_of_its_signals(admin_client):
    run = make_run("story", kwargs={"steps": 5})
    operator = User.objects.create_user("operator")
    CeleryTaskSignal.objects.pause("story", requested_by=operator, source=Source.CLI)
    completed = completed_cancel("story", Outcome.COOPERATIVE, 31.4)
    CeleryTaskSignal.objects.filter(pk=completed.pk).update(source=Source.API)
    html = admin_client.get(reverse("admin:tasksignal_taskrun_change", args=[run.pk]))
    html = html.content.decode()
    timeline = html[html.index("Timeline") :]
    for text in (
        "pause_task sent",
        "by operator, from command line",
        "cancel_task sent",
        "from API",
        "cancel_task completed",
        "cooperative",
    ):
        assert text in timeline, f"the timeline does not say {text!r}"
    assert "31.4 ms" in timeline, "the cancel's latency is not in the timeline"
    link = reverse("admin:tasksignal_celerytasksignal_change", args=[completed.pk])
    assert f'href="{link}"' in timeline, "the timeline does not link to the signal"
    signals = reverse("admin:tasksignal_celerytasksignal_changelist") + "?task_id=story"
    assert signals in html, "no link to the run's signals"
    assert "&quot;steps&quot;: 5" in html, "the kwargs are not shown"


def test_a_run_page_shows_the_error_of_a_failed_run(admin_client):
    run = make_run("broken", state=RunState.FAILED, error="ValueError('bad input')")
    run.finished_at = timezone.now()
    run.save()
    html = admin_client.get(reverse("admin:tasksignal_taskrun_change", args=[run.pk]))
    assert "ValueError(&#x27;bad input&#x27;)" in html.content.decode()


def test_the_live_view_of_a_run_page_brings_its_timeline(admin_client, runs):
    CeleryTaskSignal.objects.cancel(runs[0].task_id)
    body = admin_client.get(f"{reverse(LIVE)}?ids={runs[0].pk}&detail=1").json()
    cells = body["runs"][str(runs[0].pk)]["cells"]
    assert "cancel_task sent" in cells["timeline"], cells.get("timeline")
    assert "Not finished yet" in cells["result_display"]


# -- starting a task --------------------------------------------------------------------------
def test_start_records_a_queued_run_with_its_kwargs_and_shows_its_page(admin_client):
    response = admin_client.post(
        reverse(START), {"task": "tests.tasks.echo", "kwargs": '{"value": 7}'}
    )
    run = TaskRun.objects.get()
    assert (run.task_name, run.state, run.kwargs) == ("tests.tasks.echo", "queued", {"value": 7})
    assert response["Location"] == reverse("admin:tasksignal_taskrun_change", args=[run.pk])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ("{not json", "Not valid JSON"),
        ("[1, 2]", "Must be a JSON object"),
        ('{"x": NaN}', "Not valid JSON"),
        ('{"nope": 1}', "does not take these arguments"),
    ],
)
def test_start_refuses_kwargs_that_are_not_a_json_object_the_task_takes(
    admin_client, kwargs, error
):
    response = admin_client.post(reverse(START), {"task": "tests.tasks.echo", "kwargs": kwargs})
    assert response.status_code == 200
    assert error in response.content.decode(), f"{kwargs!r}: no {error!r} on the page"
    assert not TaskRun.objects.exists(), "a run was recorded for invalid kwargs"


@pytest.mark.parametrize("value", ["nul\x00inside", "lone \udc00 surrogate"])
def test_kwargs_postgresql_cannot_store_are_not_kept_but_the_task_still_starts(value):
    from tasksignal.api import start_recorded

    task_id = start_recorded("tests.tasks.echo", {"value": value})
    run = TaskRun.objects.get(task_id=task_id)
    assert run.kwargs is None, f"kept {run.kwargs!r}"


def test_start_offers_only_the_startable_tasks(admin_client, settings):
    settings.TASKSIGNAL_STARTABLE_TASKS = ["tests.tasks.echo"]
    html = admin_client.get(reverse(START)).content.decode()
    assert '<option value="tests.tasks.echo"' in html
    response = admin_client.post(reverse(START), {"task": "tests.tasks.noop", "kwargs": "{}"})
    assert "Select a valid choice" in response.content.decode()
    assert not TaskRun.objects.exists()


def test_start_needs_the_start_permission(client):
    client.force_login(staff_user("add_celerytasksignal"))
    assert client.get(reverse(START)).status_code == 403
    assert client.post(reverse(START), {"task": "tests.tasks.echo"}).status_code == 403
    assert "Start a task" not in client.get(reverse(CHANGELIST)).content.decode()
    client.force_login(staff_user("add_taskrun", username="starter"))
    assert "Start a task" in client.get(reverse(CHANGELIST)).content.decode()


# -- signal pages -----------------------------------------------------------------------------
def test_the_add_form_shows_no_database_default_objects(admin_client):
    html = admin_client.get(reverse(SIGNAL_ADD)).content.decode()
    assert "DatabaseDefault" not in html, "the add form shows a DatabaseDefault repr"
    assert 'name="send_anyway"' in html, "no 'Send anyway' box"


def test_the_add_form_refuses_an_unknown_task_id_unless_send_anyway_is_ticked(admin_client):
    data = {"task_id": "typed-in", "signal": "cancel_task", "message": "stop"}
    response = admin_client.post(reverse(SIGNAL_ADD), data)
    assert response.status_code == 200, "an unknown task id was accepted"
    assert "Send anyway" in response.content.decode()
    assert not CeleryTaskSignal.objects.exists()
    response = admin_client.post(reverse(SIGNAL_ADD), {**data, "send_anyway": "on"})
    assert response.status_code == 302, response.content[:500]
    signal = CeleryTaskSignal.objects.get(task_id="typed-in")
    assert signal.requested_by is not None, "requested_by was not recorded"
    assert signal.source == Source.ADMIN


def test_the_add_form_sends_to_a_known_run_and_goes_to_its_page(admin_client, runs):
    data = {"task_id": "run-0", "signal": "pause_task", "message": ""}
    response = admin_client.post(reverse(SIGNAL_ADD), data)
    assert response["Location"] == reverse("admin:tasksignal_taskrun_change", args=[runs[0].pk])
    assert CeleryTaskSignal.objects.pending("run-0", "pause_task").exists()


def test_a_duplicate_from_the_add_form_is_answered_that_it_was_already_pending(admin_client, runs):
    CeleryTaskSignal.objects.cancel("run-0", message="first")
    data = {"task_id": "run-0", "signal": "cancel_task", "message": "second"}
    response = admin_client.post(reverse(SIGNAL_ADD), data, follow=True)
    assert "was already pending" in response.content.decode(), "the duplicate was not explained"
    assert "this message was not recorded" in response.content.decode()
    assert list(CeleryTaskSignal.objects.values_list("message", flat=True)) == ["first"]


def test_a_sent_signal_is_read_only_and_links_to_its_run(admin_client, runs):
    signal = CeleryTaskSignal.objects.cancel("run-0")
    url = reverse("admin:tasksignal_celerytasksignal_change", args=[signal.pk])
    html = admin_client.get(url).content.decode()
    run_url = reverse("admin:tasksignal_taskrun_change", args=[runs[0].pk])
    assert f'href="{run_url}"' in html, "the signal page does not link to its run"
    assert 'name="_save"' not in html, "a sent signal can be edited"
    admin_client.post(url, {"task_id": "changed", "signal": "pause_task"})
    signal.refresh_from_db()
    assert (signal.task_id, signal.signal) == ("run-0", "cancel_task"), "a sent signal changed"


def test_the_signal_list_links_to_runs_without_a_query_per_row(admin_client):
    for n in range(30):
        make_run(f"s{n}")
        CeleryTaskSignal.objects.cancel(f"s{n}", requested_by=User.objects.get(username="admin"))
    url = reverse("admin:tasksignal_celerytasksignal_changelist")
    with CaptureQueriesContext(connection) as captured:
        html = admin_client.get(url).content.decode()
    assert html.count('href="/admin/tasksignal/taskrun/') >= 30, "signals do not link to runs"
    assert len(captured) <= 8, f"{len(captured)} queries for the signal list"


def test_sources_are_recorded_for_code_and_the_command_line():
    from django.core.management import call_command

    make_run("cli")
    assert CeleryTaskSignal.objects.pause("cli").source == Source.CODE
    call_command("tasksignal", "cancel", "cli", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert CeleryTaskSignal.objects.get(signal="cancel_task").source == Source.CLI


# -- with a real worker -----------------------------------------------------------------------
@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_failed_handler_keeps_its_error_on_the_signal_row(worker, admin_client):
    result = tasks.count_with_checkpoints.delay(steps=500, step_seconds=0.01)
    wait_for(lambda: TaskRun.objects.filter(task_id=result.id).exists(), 10, "the run record")
    signal = wait_until_completed(CeleryTaskSignal.objects.send(result.id, "refuse", "batch 7"))
    assert signal.outcome == Outcome.FAILED, signal.outcome
    assert signal.error == "ValueError: refused 'batch 7'", f"error kept: {signal.error!r}"
    html = admin_client.get(reverse("admin:tasksignal_celerytasksignal_changelist")).content
    assert b"ValueError: refused" in html, "the signal list does not show the error"
    stop_and_wait_for_the_record(result.id)


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_row_cancel_stops_a_real_run_and_the_list_shows_how(worker, admin_client):
    result = tasks.count_with_checkpoints.delay(steps=2000, step_seconds=0.01)
    run = wait_for(
        lambda: TaskRun.objects.filter(task_id=result.id, state=RunState.RUNNING).first(),
        10,
        "the run recorded running",
    )
    assert admin_client.post(signal_url(run, "cancel"), **JSON).status_code == 200
    wait_until_completed(CeleryTaskSignal.objects.get(task_id=result.id))
    body = admin_client.get(f"{reverse(LIVE)}?ids={run.pk}").json()["runs"][str(run.pk)]
    assert "Cancelled" in body["cells"]["state_display"], body["cells"]["state_display"]
    assert "cooperative" in body["cells"]["state_display"]
    assert body["cells"]["latency"].endswith("ms"), body["cells"]["latency"]
    stop_and_wait_for_the_record(result.id)
