"""Celery beat (``bin/beat``) stops cleanly on SIGTERM, whatever it is doing then.

A platform stops beat with SIGTERM at every deploy; the signal can land while beat waits
for the broker to accept a due task. Beat here talks to a Redis server of its own through
a proxy that withholds Redis's reply to that publish, so the signal lands exactly then.
"""

import threading
from pathlib import Path

import pytest

from tasksignal.processes import logs
from tasksignal.testing import ProjectProcess, RedisServer, TcpProxy

#: What beat logs as it starts to publish a due task.
SENDING = r"Sending due task tasksignal-sweep"


class ReplyWithholdingProxy(TcpProxy):
    """A proxy in front of Redis that stops passing Redis's replies once a client has sent
    ``LPUSH`` (Celery's publish on Redis): the client then waits for its reply, as it
    would on a stalled network. ``withholding`` is set from that moment."""

    def __init__(self, upstream: str) -> None:
        self.withholding = threading.Event()
        super().__init__(upstream)

    def request(self, data: bytes) -> bool:
        """Pass every request; note the first ``LPUSH``."""
        if b"LPUSH" in data.upper():
            self.withholding.set()
        return True

    def reply(self, data: bytes) -> bool:
        """Pass replies until a client sent ``LPUSH``."""
        return not self.withholding.is_set()


class BeatProcess(ProjectProcess):
    """``bin/beat`` sending the sweep every second, with its schedule file in ``folder``;
    ready once it starts to send the sweep."""

    script = "beat"

    def __init__(self, folder: Path, **kwargs) -> None:
        env = {
            "CELERY_BEAT_SCHEDULE_FILE": str(folder / "celerybeat-schedule"),
            "TASKSIGNAL_SWEEP_INTERVAL": "1",
            **kwargs.pop("env", {}),
        }
        super().__init__(env=env, log_path=folder / "beat.log", **kwargs)

    def ready(self) -> bool:
        """Beat has logged that it sends the sweep."""
        return logs(SENDING)(self)


@pytest.fixture
def redis_proxy(tmp_path):
    with RedisServer(tmp_path) as redis_server:
        proxy = ReplyWithholdingProxy(redis_server.url)
        yield proxy
        proxy.close()


def test_beat_stopped_while_it_publishes_a_due_task_exits_cleanly(tmp_path, redis_proxy):
    beat = BeatProcess(tmp_path, env={"CELERY_BROKER_URL": redis_proxy.url})
    with beat.start():
        assert redis_proxy.withholding.wait(30), "beat never published the sweep"
        code = beat.terminate(timeout=15)
    log = beat.log()
    assert code == 0, f"beat exited with {code} after SIGTERM during a publish:\n{log[-3000:]}"
    assert "Traceback" not in log, f"beat logged an error on its way out:\n{log[-3000:]}"
