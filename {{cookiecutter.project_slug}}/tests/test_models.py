"""The signal row: sending, idempotency, completion once, kinds, and the sweep."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError
from django.utils import timezone

from tasksignal import subjects
from tasksignal.exceptions import UnknownSignal
from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun, TaskSubject
from tasksignal.registry import register_signal, signal_choices
from tasksignal.sweep import sweep

pytestmark = pytest.mark.django_db


def test_sending_a_pending_signal_again_returns_the_same_row():
    first = CeleryTaskSignal.objects.cancel("t1")
    second = CeleryTaskSignal.objects.cancel("t1")
    assert first.pk == second.pk, "a second pending cancel row was created"


def test_database_refuses_two_pending_rows_of_one_kind_for_one_task():
    CeleryTaskSignal.objects.create(task_id="t2", signal=CeleryTaskSignal.CANCEL_TASK)
    with pytest.raises(IntegrityError):
        CeleryTaskSignal.objects.create(task_id="t2", signal=CeleryTaskSignal.CANCEL_TASK)


def test_a_new_signal_may_follow_a_completed_one():
    first = CeleryTaskSignal.objects.pause("t3")
    first.mark_completed("paused")
    second = CeleryTaskSignal.objects.pause("t3")
    assert second.pk != first.pk, "a completed signal blocked a new one"


def test_created_and_completed_at_come_from_the_database_clock():
    signal = CeleryTaskSignal.objects.cancel("t4")
    assert signal.created is not None, "created was not read back after insert"
    signal.mark_completed("cooperative")
    assert signal.completed_at >= signal.created


def test_mark_completed_completes_only_once():
    signal = CeleryTaskSignal.objects.cancel("t5")
    twin = CeleryTaskSignal.objects.get(pk=signal.pk)
    assert signal.mark_completed("cooperative") is True
    assert twin.mark_completed("killed") is False, "a second completion was accepted"
    twin.refresh_from_db()
    assert twin.outcome == "cooperative", f"the outcome was overwritten with {twin.outcome}"


def test_unknown_signal_is_refused_with_its_name():
    with pytest.raises(UnknownSignal, match="'explode'"):
        CeleryTaskSignal.objects.send("t6", "explode")


def test_registered_signal_kind_becomes_a_choice_without_a_migration():
    register_signal("test_kind", lambda task, signal: None)
    assert "test_kind" in dict(signal_choices())
    CeleryTaskSignal.objects.send("t7", "test_kind", message="hi")


def test_registering_a_taken_name_with_another_handler_is_an_error():
    register_signal("taken_kind", print)
    with pytest.raises(ValueError, match="already registered"):
        register_signal("taken_kind", repr)


def test_sweep_completes_pending_signals_of_finished_runs_as_too_late():
    TaskRun.objects.create(task_id="t8", task_name="x", state=TaskRun.State.SUCCEEDED)
    signal = CeleryTaskSignal.objects.cancel("t8")
    assert sweep()["too_late"] == 1
    signal.refresh_from_db()
    assert signal.outcome == "too_late"


def test_sweep_expires_signals_for_tasks_that_never_ran(settings):
    settings.TASKSIGNAL_SIGNAL_EXPIRY = 60
    signal = CeleryTaskSignal.objects.cancel("t9")
    CeleryTaskSignal.objects.filter(pk=signal.pk).update(
        created=timezone.now() - timedelta(hours=1)
    )
    assert sweep()["expired"] == 1
    signal.refresh_from_db()
    assert signal.outcome == "expired"


def test_sweep_keeps_a_fresh_pending_signal():
    signal = CeleryTaskSignal.objects.cancel("t10")
    sweep()
    signal.refresh_from_db()
    assert not signal.completed, "the sweep completed a signal that may still be consumed"


def test_sweep_purges_completed_signals_and_runs_past_retention(settings):
    settings.TASKSIGNAL_RETENTION = 60
    old = timezone.now() - timedelta(hours=1)
    signal = CeleryTaskSignal.objects.cancel("t11")
    signal.mark_completed("cooperative")
    CeleryTaskSignal.objects.filter(pk=signal.pk).update(completed_at=old)
    TaskRun.objects.create(task_id="t11", task_name="x", state="cancelled", finished_at=old)
    counts = sweep()
    assert counts["signals_purged"] == 1, counts
    assert counts["runs_purged"] == 1, counts


def test_sweep_settles_a_stale_running_record_whose_task_celery_reports_finished():
    from celery import states
    from celery.result import AsyncResult

    TaskRun.objects.create(task_id="t12", task_name="x", state="running")
    TaskRun.objects.filter(task_id="t12").update(updated_at=timezone.now() - timedelta(hours=1))
    AsyncResult("t12").backend.store_result("t12", None, states.SUCCESS)
    assert sweep()["runs_settled"] == 1
    assert TaskRun.objects.get(task_id="t12").state == "succeeded"


def test_sweep_leaves_a_stale_record_of_a_task_celery_does_not_know_finished():
    TaskRun.objects.create(task_id="t13", task_name="x", state="running")
    TaskRun.objects.filter(task_id="t13").update(updated_at=timezone.now() - timedelta(hours=1))
    assert sweep()["runs_settled"] == 0
    assert TaskRun.objects.get(task_id="t13").state == "running"


def test_sweep_purges_lineage_and_subjects_older_than_the_retention(settings):
    settings.TASKSIGNAL_RETENTION = 60
    long_ago = timezone.now() - timedelta(hours=1)
    TaskLineage.objects.create(task_id="old", ancestors=["root"])
    TaskLineage.objects.create(task_id="new", ancestors=["root"])
    subjects.record("old", User.objects.create(username="subject"))
    TaskLineage.objects.filter(task_id="old").update(created=long_ago)
    TaskSubject.objects.update(created=long_ago)
    counts = sweep()
    assert (counts["lineage_purged"], counts["subjects_purged"]) == (1, 1), counts
    assert list(TaskLineage.objects.values_list("task_id", flat=True)) == ["new"]
