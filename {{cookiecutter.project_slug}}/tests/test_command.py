"""``manage.py tasksignal``."""

import pytest
from django.core.management import CommandError, call_command

from tasksignal.models import CeleryTaskSignal, TaskRun

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
