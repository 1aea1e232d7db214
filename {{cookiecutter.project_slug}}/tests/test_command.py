"""``manage.py tasksignal``."""

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import RunState

pytestmark = pytest.mark.django_db


def test_cancel_sends_to_a_recorded_run(capsys):
    TaskRun.objects.create(task_id="known", task_name="demo", state="running")
    call_command("tasksignal", "cancel", "known", "--message", "bye")
    assert CeleryTaskSignal.objects.get(task_id="known").message == "bye"
    assert "sent" in capsys.readouterr().out


def test_unknown_task_id_is_a_clear_error():
    with pytest.raises(CommandError, match=r"unknown task id.*nope.*--force"):
        call_command("tasksignal", "pause", "nope")
    assert not CeleryTaskSignal.objects.exists()


def test_force_signals_a_task_that_is_still_queued():
    call_command("tasksignal", "cancel", "queued-id", "--force")
    assert CeleryTaskSignal.objects.pending(task_id="queued-id").exists()


def test_list_shows_unfinished_runs_and_pending_signals(capsys):
    TaskRun.objects.create(task_id="listed", task_name="demo.job", state="running")
    CeleryTaskSignal.objects.cancel("listed")
    call_command("tasksignal", "list")
    out = capsys.readouterr().out
    assert "listed  demo.job  running" in out, out
    assert "pending: cancel_task" in out, out


def test_cancel_cascade_reaches_the_recorded_descendants(capsys):
    TaskLineage.objects.create(task_id="child", ancestors=["parent"])
    TaskLineage.objects.create(task_id="grandchild", ancestors=["parent", "child"])
    call_command("tasksignal", "cancel", "parent", "--cascade")
    cancels = CeleryTaskSignal.objects.pending(signal=CANCEL_TASK)
    pending = cancels.filter(task_id__in=["child", "grandchild"])
    assert pending.filter(cascade=True).count() == 2, "the descendants got no cascade cancel"
    assert "reached 3 task(s), 3 still to stop" in capsys.readouterr().out


def test_cancel_by_name_and_state_asks_first_and_sends_on_yes(capsys, monkeypatch):
    TaskRun.objects.create(task_id="a", task_name="demo.job", state=RunState.RUNNING)
    TaskRun.objects.create(task_id="b", task_name="demo.job", state=RunState.PAUSED)
    TaskRun.objects.create(task_id="c", task_name="demo.other", state=RunState.RUNNING)
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    call_command("tasksignal", "cancel", "--task", "demo.job", "--state", RunState.RUNNING)
    assert "1 unfinished run(s) match" in capsys.readouterr().out
    assert set(CeleryTaskSignal.objects.values_list("task_id", flat=True)) == {"a"}


def test_cancel_by_filter_sends_nothing_unless_confirmed(monkeypatch):
    TaskRun.objects.create(task_id="a", task_name="demo.job", state=RunState.RUNNING)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="nothing sent"):
        call_command("tasksignal", "cancel", "--task", "demo.job")
    assert not CeleryTaskSignal.objects.exists(), "a cancel was sent without confirmation"


def test_cancel_by_worker_and_age_with_yes_skips_the_question(capsys):
    old = timezone.now() - timedelta(hours=2)
    TaskRun.objects.create(
        task_id="old", task_name="j", state=RunState.RUNNING, worker="w1", started_at=old
    )
    TaskRun.objects.create(
        task_id="new", task_name="j", state=RunState.RUNNING, worker="w1", started_at=timezone.now()
    )
    TaskRun.objects.create(
        task_id="else", task_name="j", state=RunState.RUNNING, worker="w2", started_at=old
    )
    call_command("tasksignal", "cancel", "--worker", "w1", "--older-than", "1h", "--yes")
    assert set(CeleryTaskSignal.objects.values_list("task_id", flat=True)) == {"old"}
    assert "reached 1 task(s)" in capsys.readouterr().out


def test_a_bad_age_or_state_is_a_clear_error():
    with pytest.raises(CommandError, match="'soon' is not an age"):
        call_command("tasksignal", "cancel", "--older-than", "soon", "--yes")
    with pytest.raises(
        CommandError, match="state 'succeeded' is not one of paused, queued, running"
    ):
        call_command("tasksignal", "cancel", "--state", RunState.SUCCEEDED, "--yes")
