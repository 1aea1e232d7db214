"""Zero collateral: cancels and kills hit only their own task."""

import random

import pytest

from tasksignal.models import CeleryTaskSignal
from tests import tasks
from tests.conftest import wait_until_completed, wait_until_running

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_siblings_on_the_same_worker_finish_correctly_while_others_are_cancelled(worker):
    rng = random.Random(7)
    siblings = [tasks.echo.delay(n, rng.uniform(0.05, 0.3)) for n in range(60)]
    victims = [
        shape.delay()
        for shape in (tasks.count_with_checkpoints, tasks.sleep_without_checkpoints) * 4
        + (tasks.hold_the_gil,) * 2
    ]
    signals = []
    for victim in victims:
        wait_until_running(victim, timeout=30)
        signals.append(CeleryTaskSignal.objects.cancel(victim.id))
    answers = [sibling.get(timeout=60) for sibling in siblings]
    outcomes = [wait_until_completed(signal, timeout=30).outcome for signal in signals]
    assert answers == list(range(60)), "a sibling task was harmed or returned a wrong result"
    assert all(outcomes), f"a cancel was not honoured: {outcomes}"
    assert outcomes.count("killed") == 2, f"expected the two GIL-holders killed: {outcomes}"


def test_late_cancels_of_finished_tasks_never_hit_the_next_task(worker):
    # Cancels arrive just after their tasks finished, while the same processes run others.
    finished = [tasks.echo.delay(n) for n in range(40)]
    followers = []
    for result in finished:
        result.get(timeout=30)
        CeleryTaskSignal.objects.cancel(result.id)
        followers.append(tasks.echo.delay(result.id, 0.05))
    answers = [follower.get(timeout=60) for follower in followers]
    assert answers == [r.id for r in finished], "a late cancel stopped an innocent task"
