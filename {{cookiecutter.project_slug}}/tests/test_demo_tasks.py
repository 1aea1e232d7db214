"""The demo app's tasks behave as their docstrings promise (real worker)."""

import pytest
from celery import states

from demo import tasks
from demo.models import DemoRecord
from tasksignal.models import CeleryTaskSignal
from tests.conftest import wait_for, wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_add_returns_the_sum(worker):
    assert tasks.add.delay(2, 3).get(timeout=15) == 5


def test_set_step_seconds_signal_changes_a_running_job(worker):
    result = tasks.cooperative_job.delay(steps=20, step_seconds=0.2)
    wait_until_running(result)
    signal = CeleryTaskSignal.objects.send(result.id, "set_step_seconds", message="0.01")
    assert wait_until_completed(signal).outcome == "handled"
    assert result.get(timeout=20)["step_seconds"] == 0.01


def test_cancelled_write_records_leaves_no_rows(worker):
    result = tasks.write_records.delay("demo-batch", rows=200, step_seconds=0.02)
    wait_until_running(result)
    wait_until_completed(CeleryTaskSignal.objects.cancel(result.id))
    wait_for(lambda: result.state == states.REVOKED, 10, "REVOKED")
    assert not DemoRecord.objects.filter(batch="demo-batch").exists()


def test_sibling_job_returns_seed_twice_plus_steps(worker):
    assert tasks.sibling_job.delay(21, steps=3, step_seconds=0.01).get(timeout=15) == 45
