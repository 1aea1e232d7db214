"""Run a real Celery worker subprocess, for tests, benchmarks and the load test.

Never eager mode: signalling is about processes, so it is tested with processes::

    with WorkerProcess(concurrency=2, env={"DATABASE_URL": url}) as worker:
        result = my_task.delay()
        ...

The worker is started through ``bin/worker`` (the same script production and compose
run), in its own process group, and stopped with a warm shutdown (SIGTERM); whatever is
still alive after ``stop_timeout`` is killed with its whole group, so a test never leaves
orphans behind.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
from django.conf import settings

PROJECT_DIR = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A ``celery worker`` subprocess on this project's queue and signal channel.

    ``env`` adds to (and overrides) the environment; the queue, the channel and the
    settings module default to the current process's so that tasks sent from here reach it.
    ``queue`` gives the worker a queue of its own (send with ``apply_async(queue=...)``).
    ``app`` is the Celery app used to ping it (default: the current one); pass one bound to
    the worker's broker when ``env`` gives it another.
    """

    def __init__(
        self,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        hostname: str | None = None,
        queue: str | None = None,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        app=None,
    ) -> None:
        self.hostname = hostname or f"worker-{uuid.uuid4().hex[:8]}@%h"
        self.queue = queue or settings.CELERY_TASK_DEFAULT_QUEUE
        self.concurrency = concurrency
        self.pool = pool
        self.extra_args = extra_args
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / (  # noqa: S108
            f"{self.hostname.split('@')[0]}.log"
        )
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get(
                "DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE
            ),
            "CELERY_TASK_DEFAULT_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
            "TASKSIGNAL_CHANNEL": settings.TASKSIGNAL_CHANNEL,
            "CELERY_BROKER_KEY_PREFIX": settings.CELERY_BROKER_TRANSPORT_OPTIONS.get(
                "global_keyprefix", ""
            ),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self._app = app

    @property
    def node_name(self) -> str:
        """The worker's node name as Celery reports it (``%h`` expanded)."""
        from celery.utils.nodenames import host_format

        return host_format(self.hostname)

    def start(self) -> "WorkerProcess":
        """Start the worker and wait until it answers a ping."""
        from celery import current_app

        app = self._app or current_app
        command = [
            str(PROJECT_DIR / "bin" / "worker"),
            "--pool",
            self.pool,
            "--concurrency",
            str(self.concurrency),
            "--hostname",
            self.hostname,
            "--without-mingle",
            "--without-gossip",
            "--queues",
            self.queue,
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.process.returncode}: {self.log_tail()}"
                )
            if app.control.ping(destination=[self.node_name], timeout=0.5):
                return self
        self.kill()
        raise RuntimeError(f"worker did not answer within {self.ready_timeout}s: {self.log_tail()}")

    def child_pids(self) -> list[int]:
        """The pool processes of the worker (prefork children)."""
        try:
            return [child.pid for child in psutil.Process(self.process.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int | None:
        """Warm shutdown (SIGTERM); kill the process group if it does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker and everything it started, as a crash would."""
        self._kill_group()
        self.process.wait(10)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the worker's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> "WorkerProcess":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def running_pid(task_id: str) -> int | None:
    """The pid of the process executing ``task_id`` on any worker node of this machine, by
    the nodes' mailboxes; ``None`` while no process runs it.

    The run writes its mailbox itself when it starts, so this sees even a task stuck in C
    code holding the GIL.
    """
    from tasksignal.board import Board, board_dir

    folder = board_dir()
    for path in folder.glob("*.board") if folder.is_dir() else ():
        board = Board.open(path)
        if board is None:
            continue
        try:
            index = board.find(task_id)
            run = None if index is None else board.read_run(index, task_id)
            if run is not None and board.runs(index, task_id, run.pid):
                return run.pid
        finally:
            board.close()
    return None


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the worker when the process that started it dies (a killed
    test run must not leave workers behind); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
