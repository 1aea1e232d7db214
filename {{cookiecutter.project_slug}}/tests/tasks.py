"""Tasks the test suite runs on a real worker (``--include tests.tasks``).

Each one has a single shape of work, so each test can name the ladder step it expects.
Files passed in as paths let the tests observe, from outside the worker, what ran.
"""

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from celery import group, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_revoked
from django.contrib.auth.models import User
from django.db import connection, transaction

from tasksignal import shapes
from tasksignal.base import SignalAwareTask
from tasksignal.registry import register_signal

# Short rungs keep the suite fast; every test reads them from here.
CANCEL_GRACE = 0.3
KILL_AFTER = 2.0


def _append(path: str, line: str) -> None:
    with open(path, "a") as file:
        file.write(line + "\n")


def append_message(task, signal) -> None:
    """Handler of the test-only ``append_message`` signal kind."""
    task.run_state.setdefault("messages", []).append(signal.message)


register_signal("append_message", append_message)


def refuse(task, signal) -> None:
    """Handler of the test-only ``refuse`` signal kind: it always fails, saying why."""
    raise ValueError(f"refused {signal.message!r}")


register_signal("refuse", refuse)

#: Where the worker's ``task_revoked`` receiver below writes, when the tests set it.
REVOKED_LOG_VARIABLE = "TESTS_TASK_REVOKED_LOG"


@task_revoked.connect
def log_revoked(request=None, terminated=None, **kwargs) -> None:
    """Write each revoked task's id and pid (the worker's main process sends this signal)."""
    path = os.environ.get(REVOKED_LOG_VARIABLE)
    if path and request is not None:
        _append(path, f"{request.id} {os.getpid()} terminated={terminated}")


signal_aware: dict[str, Any] = {"base": SignalAwareTask, "bind": True}
rungs: dict[str, Any] = {"cancel_grace": CANCEL_GRACE, "kill_after": KILL_AFTER}


@shared_task(**signal_aware)
def noop(self) -> None:
    """Do nothing."""


@shared_task(**signal_aware)
def echo(self, value, seconds: float = 0.0):
    """Return ``value`` after ``seconds`` of checkpointed sleep: the sibling that must survive."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        self.checkpoint()
        time.sleep(0.01)
    return value


@shared_task(**signal_aware, **rungs)
def mark_started(self, marker: str, seconds: float = 5.0) -> str:
    """Write ``marker`` as the body's first act, then sleep: shows whether the body ran."""
    _append(marker, self.request.id)
    time.sleep(seconds)
    return "done"


@shared_task(**signal_aware, **rungs)
def count_with_checkpoints(self, steps: int = 1000, step_seconds: float = 0.01) -> dict:
    """Count with a checkpoint and progress every step; returns what custom signals said."""
    shapes.cooperate(self, steps, step_seconds)
    return {"steps": steps, "messages": self.run_state.get("messages", [])}


@shared_task(**signal_aware, **rungs)
def sleep_without_checkpoints(self, seconds: float = 60.0) -> str:
    """One long ``time.sleep``."""
    shapes.sleep(seconds)
    return "slept"


@shared_task(**signal_aware, **rungs)
def wait_on_socket(self, seconds: float = 60.0) -> str:
    """Block reading a socket nobody writes to."""
    return shapes.block_on_socket(self, seconds)


@shared_task(**signal_aware, **rungs)
def busy_python_loop(self, seconds: float = 60.0) -> int:
    """Spin in pure Python without a checkpoint."""
    end, spins = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        spins += 1
    return spins


@shared_task(**signal_aware, **rungs)
def hold_the_gil(self, n: int = 10**11) -> int:
    """C code that never releases the GIL: only a kill from outside stops it."""
    return shapes.hold_the_gil(n)


@shared_task(**signal_aware, **rungs)
def swallow_interrupts(self, seconds: float = 60.0) -> str:
    """Swallow every interrupt with a bare except (as careless code does)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:  # noqa: SIM105 - swallowing everything is this task's point
            time.sleep(0.05)
        except:  # noqa: E722, S110
            pass
    return "survived"


@shared_task(**signal_aware, **rungs)
def query_postgres_sleep(self, seconds: float = 60.0) -> str:
    """Wait inside a database query (``pg_sleep``): an interrupt lands mid-query."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return "queried"


@shared_task(**signal_aware, **rungs)
def ignore_interrupts_in_a_query(self, seconds: float = 60.0) -> str:
    """Disable the interrupt (its own SIGUSR2 handler), then wait in a server-side query:
    only the kill stops it, and the query must not outlive it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return "queried"


@shared_task(**signal_aware)
def hold_a_connection(self, seconds: float = 5.0) -> int:
    """Open this process's database connection, then wait (checkpointing) with it open."""
    connection.ensure_connection()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        self.checkpoint()
        time.sleep(0.02)
    return connection.connection.info.backend_pid


@shared_task(**signal_aware)
def count_users(self, prefix: str) -> int:
    """How many users start with ``prefix`` (uses this process's database connection)."""
    return User.objects.filter(username__startswith=prefix).count()


@shared_task(**signal_aware, **rungs)
def create_users_in_transaction(self, prefix: str, count: int = 50) -> int:
    """Create users inside one transaction, checkpointing between them."""
    with transaction.atomic():
        for number in range(count):
            User.objects.create(username=f"{prefix}{number}")
            self.checkpoint()
            time.sleep(0.02)
    return count


@shared_task(**signal_aware, **rungs)
def start_subprocess(self, pid_file: str, seconds: float = 60.0) -> str:
    """Start a ``sleep`` subprocess, write its pid, then wait for it."""
    process = subprocess.Popen(["sleep", str(int(seconds))])
    Path(pid_file).write_text(str(process.pid))
    process.wait()
    return "child exited"


@shared_task(**signal_aware, **rungs)
def start_subprocess_then_hold_the_gil(self, pid_file: str, n: int = 10**11) -> int:
    """Start a ``sleep`` subprocess, then hold the GIL: killed, with its subprocess."""
    process = subprocess.Popen(["sleep", "600"])
    Path(pid_file).write_text(str(process.pid))
    return sum(range(n))


class CleanupRecordingTask(SignalAwareTask):
    """Writes ``on_cancel`` to the log file given as the task's first argument."""

    def on_cancel(self, exc) -> None:
        _append(self.request.args[0], "on_cancel")


@shared_task(base=CleanupRecordingTask, bind=True, **rungs)
def record_cleanups(self, log: str, seconds: float = 60.0) -> str:
    """Register two cleanups, then sleep until cancelled."""
    self.add_cleanup(_append, log, "first registered")
    self.add_cleanup(_append, log, "second registered")
    time.sleep(seconds)
    return "not cancelled"


@shared_task(**signal_aware, soft_time_limit=0.5)
def exceed_soft_time_limit(self) -> str:
    """Sleep past the soft time limit and report that Celery's limit still fires."""
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        return "soft time limit"
    return "no limit"


@shared_task
def plain_sleep(marker: str, seconds: float = 60.0) -> str:
    """A task that is not signal-aware: write ``marker``, then sleep (Celery's revoke applies)."""
    _append(marker, "started")
    time.sleep(seconds)
    return "done"


# -- workflows for the cascade tests -------------------------------------------------------


@shared_task(**signal_aware, **rungs)
def mark_and_wait(self, marker: str, seconds: float = 30.0) -> str:
    """Write this task's id to ``marker``, then wait at checkpoints: a workflow's step."""
    _append(marker, self.request.id)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        self.checkpoint()
        time.sleep(0.01)
    return self.request.id


@shared_task(**signal_aware, **rungs)
def fan_out(self, marker: str, depth: int, width: int = 2, seconds: float = 30.0) -> str:
    """Start a group of ``width`` copies of itself one level down (``mark_and_wait`` at the
    bottom), then wait at checkpoints: a tree of tasks ``depth`` levels deep."""
    _append(marker, self.request.id)
    if depth > 1:
        group(fan_out.si(marker, depth - 1, width, seconds) for _ in range(width)).delay()
    else:
        group(mark_and_wait.si(marker, seconds) for _ in range(width)).delay()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        self.checkpoint()
        time.sleep(0.01)
    return self.request.id


@shared_task(bind=True)
def spawn_later(self, log: str, marker: str, delay: float = 1.0) -> str:
    """A plain task (no checkpoints, cannot be cancelled) that starts a signal-aware child
    after ``delay``, writing the child's id to ``log``: a child started after a cascade."""
    time.sleep(delay)
    child = mark_and_wait.delay(marker, 5.0)
    _append(log, child.id)
    return child.id


@shared_task(bind=True)
def send_child_on_cue(self, started: str, cue: str) -> str:
    """A plain task that creates ``started``, waits for the file ``cue``, then sends a child
    (which has a lineage: this task): a send at a moment the test chooses."""
    Path(started).touch()
    while not Path(cue).exists():
        time.sleep(0.05)
    return echo.delay("child").id
