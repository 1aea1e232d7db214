"""Flower's Revoke and Terminate buttons go through tasksignal for signal-aware tasks.

The buttons POST to Flower's API (``/api/task/revoke/<id>``, with ``terminate=true`` for
Terminate), which broadcasts Celery's ``revoke`` control command; Flower answers the API
only with authentication configured, here basic auth as ``.env.example`` suggests.
"""

import base64
import urllib.error
import urllib.request

import pytest

from tasksignal.states import Outcome
from tasksignal.testing import ProjectProcess, free_port
from tests import tasks
from tests.conftest import wait_until_running
from tests.test_control import cancel_of, shows_revoked

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

CREDENTIALS = "operator:s3cret"


class FlowerProcess(ProjectProcess):
    """Flower (``bin/flower``) on a free loopback port, with basic auth."""

    script = "flower"

    def __init__(self, **kwargs) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"FLOWER_PORT": str(self.port), "FLOWER_BASIC_AUTH": CREDENTIALS}
        super().__init__(env={**env, **kwargs.pop("env", {})}, **kwargs)
        self.args = ("--address=127.0.0.1",)

    def ready(self) -> bool:
        """``/healthcheck`` answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def press(self, task_id: str, terminate: bool) -> int:
        """POST what the task page's Revoke (or Terminate) button posts; return the status."""
        data = f"terminate={'true' if terminate else 'false'}".encode()
        request = urllib.request.Request(  # noqa: S310
            f"{self.url}/api/task/revoke/{task_id}", data=data, method="POST"
        )
        token = base64.b64encode(CREDENTIALS.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    process = FlowerProcess(log_path=tmp_path_factory.mktemp("flower") / "flower.log")
    with process.start():
        yield process


def test_flower_revoke_button_stops_a_running_signal_aware_task(worker, flower):
    result = tasks.sleep_without_checkpoints.delay(60)
    wait_until_running(result)
    assert flower.press(result.id, terminate=False) == 200, "Flower refused the revoke"
    signal = cancel_of(result.id)
    assert signal.outcome == Outcome.INTERRUPTED, f"Revoke's cancel says {signal.outcome}"
    assert shows_revoked(result.id), f"the stopped task shows {result.state}"


def test_flower_terminate_button_kills_the_task_in_isolation(worker, flower):
    result = tasks.hold_the_gil.delay()
    wait_until_running(result)
    assert flower.press(result.id, terminate=True) == 200, "Flower refused the terminate"
    signal = cancel_of(result.id)
    took = (signal.completed_at - signal.created).total_seconds()
    assert signal.outcome == Outcome.KILLED, f"Terminate's cancel says {signal.outcome}"
    assert took < tasks.KILL_AFTER, f"Terminate waited {took:.2f}s, as long as kill_after"
    assert shows_revoked(result.id), f"the killed task shows {result.state}"
