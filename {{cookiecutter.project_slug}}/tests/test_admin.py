"""Admin actions send signals; only users with the model's permission may."""

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from tasksignal.models import CeleryTaskSignal, TaskRun

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:tasksignal_taskrun_changelist"


@pytest.fixture
def runs():
    return [
        TaskRun.objects.create(task_id=f"run-{n}", task_name="demo", state="running")
        for n in range(3)
    ]


def staff_user(*permissions: str) -> User:
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    for codename in ("view_taskrun", "change_taskrun", *permissions):
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def run_action(client, action: str, runs):
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [run.pk for run in runs]},
        follow=True,
    )


def test_cancel_action_sends_a_cancel_to_each_selected_running_task(admin_client, runs):
    response = run_action(admin_client, "cancel_selected", runs)
    assert response.status_code == 200
    pending = set(
        CeleryTaskSignal.objects.pending(signal="cancel_task").values_list("task_id", flat=True)
    )
    assert pending == {run.task_id for run in runs}, f"cancels pending for {pending}"


def test_pause_and_resume_actions_send_their_signals(admin_client, runs):
    run_action(admin_client, "pause_selected", runs[:1])
    run_action(admin_client, "resume_selected", runs[:1])
    kinds = sorted(CeleryTaskSignal.objects.values_list("signal", flat=True))
    assert kinds == ["pause_task", "resume_task"], kinds


def test_finished_runs_are_not_signalled(admin_client, runs):
    TaskRun.objects.filter(pk=runs[0].pk).update(state="succeeded")
    run_action(admin_client, "cancel_selected", runs)
    assert not CeleryTaskSignal.objects.filter(task_id=runs[0].task_id).exists()


def test_user_without_signal_permission_cannot_cancel(client, runs):
    client.force_login(staff_user())
    response = run_action(client, "cancel_selected", runs)
    assert not CeleryTaskSignal.objects.exists(), "a user without permission sent signals"
    assert response.status_code == 200  # the admin answers "no action selected"


def test_user_with_signal_permission_can_cancel(client, runs):
    client.force_login(staff_user("add_celerytasksignal"))
    run_action(client, "cancel_selected", runs)
    assert CeleryTaskSignal.objects.count() == 3


def test_signal_added_in_the_admin_goes_through_send(admin_client):
    response = admin_client.post(
        reverse("admin:tasksignal_celerytasksignal_add"),
        {"task_id": "typed-in", "signal": "cancel_task", "message": "stop"},
    )
    assert response.status_code == 302, response.content[:500]
    signal = CeleryTaskSignal.objects.get(task_id="typed-in")
    assert signal.requested_by is not None, "requested_by was not recorded"


def test_lifecycle_fields_are_read_only_on_a_sent_signal(admin_client):
    signal = CeleryTaskSignal.objects.cancel("read-only")
    url = reverse("admin:tasksignal_celerytasksignal_change", args=[signal.pk])
    admin_client.post(url, {"task_id": "changed", "signal": "pause_task"})
    signal.refresh_from_db()
    assert (signal.task_id, signal.signal) == ("read-only", "cancel_task"), "a sent signal changed"
