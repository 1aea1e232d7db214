"""The admin's cascade option on bulk cancels: what it sends, and who may send it."""

import pytest
from django.urls import reverse

from tasksignal.models import CeleryTaskSignal, TaskLineage
from tasksignal.registry import CANCEL_TASK
from tests.test_admin import CANCEL_MATCHING, make_run, run_action, staff_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def family():
    """A running parent with a child and a grandchild recorded, and an unrelated run."""
    TaskLineage.objects.create(task_id="child", ancestors=["parent"])
    TaskLineage.objects.create(task_id="grandchild", ancestors=["parent", "child"])
    return make_run("parent"), make_run("stranger", task_name="tasks.other")


def cancelled() -> set[str]:
    return set(
        CeleryTaskSignal.objects.filter(signal=CANCEL_TASK).values_list("task_id", flat=True)
    )


def test_the_confirmation_offers_the_cascade(admin_client, family):
    html = run_action(admin_client, "cancel_selected", family[:1]).content.decode()
    assert 'name="cascade"' in html, "the confirmation page has no cascade option"


def test_cancel_selected_with_cascade_cancels_what_the_run_started(admin_client, family):
    response = run_action(admin_client, "cancel_selected", family[:1], post="yes", cascade="on")
    assert cancelled() == {"parent", "child", "grandchild"}, cancelled()
    assert "Sent cancel to 3 tasks" in response.content.decode()


def test_cancel_selected_without_cascade_leaves_the_children_alone(admin_client, family):
    run_action(admin_client, "cancel_selected", family[:1], post="yes")
    assert cancelled() == {"parent"}, cancelled()


def test_cancel_matching_the_filtered_list_with_cascade(admin_client, family):
    url = f"{reverse(CANCEL_MATCHING)}?task=tests.tasks.count_with_checkpoints"
    admin_client.post(url, {"cascade": "on"})
    assert cancelled() == {"parent", "child", "grandchild"}, "the filter or the cascade failed"


def test_a_cascade_needs_the_send_permission(client, family):
    client.force_login(staff_user())
    run_action(client, "cancel_selected", family[:1], post="yes", cascade="on")
    assert client.post(reverse(CANCEL_MATCHING), {"cascade": "on"}).status_code == 403
    assert not cancelled(), "a user without the send permission cascaded a cancel"
