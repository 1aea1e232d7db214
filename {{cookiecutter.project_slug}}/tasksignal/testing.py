"""Run the project's real processes, for tests, benchmarks and the load test.

Never eager mode: signalling is about processes, so it is tested with processes::

    with WorkerProcess(concurrency=2, env={"DATABASE_URL": url}) as worker:
        result = my_task.delay()
        ...

    with WebProcess(env={"DATABASE_URL": url}) as web:
        urllib.request.urlopen(f"{web.url}/healthz")

Each is started through its ``bin/`` script (the same one production, the Procfile and
compose run), in its own process group, and stopped the way a platform stops it
(SIGTERM: a warm shutdown); whatever is still alive after ``stop_timeout`` is killed with
its whole group, so a test never leaves orphans behind.
"""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
from django.conf import settings

PROJECT_DIR = Path(__file__).resolve().parent.parent


class ProjectProcess:
    """A ``bin/<script>`` subprocess of this project, alone in its process group.

    ``env`` adds to (and overrides) the environment, which starts as the current
    process's with the settings module, the Celery queue and the signal channel this
    process uses (so that what it sends reaches the process, and the other way round).
    Subclasses say how to tell when it is ready (:meth:`ready`).
    """

    script = ""

    def __init__(
        self,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        name: str = "",
    ) -> None:
        self.args = args
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.name = name or f"{self.script}-{uuid.uuid4().hex[:8]}"
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"{self.name}.log"  # noqa: S108
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
        self._log = None

    def command(self) -> list[str]:
        """The command line: ``bin/<script>`` and its arguments."""
        return [str(PROJECT_DIR / "bin" / self.script), *self.args]

    def ready(self) -> bool:
        """Whether the process serves yet (asked repeatedly while it starts)."""
        raise NotImplementedError

    def start(self):
        """Start the process and wait until :meth:`ready`; return ``self``."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(),
            cwd=PROJECT_DIR,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.script} exited with {self.process.returncode}: {self.log_tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"{self.script} was not ready within {self.ready_timeout}s: {self.log_tail()}"
        )

    def child_pids(self) -> list[int]:
        """The processes the main process started (prefork pool, gunicorn workers)."""
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
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything it started, as a crash would."""
        self._kill_group()
        self.process.wait(10)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self):
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class WorkerProcess(ProjectProcess):
    """A ``celery worker`` (``bin/worker``) on this project's queue and signal channel.

    ``queue`` gives the worker a queue of its own (send with ``apply_async(queue=...)``).
    ``app`` is the Celery app used to ping it (default: the current one); pass one bound to
    the worker's broker when ``env`` gives it another.
    """

    script = "worker"

    def __init__(
        self,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        hostname: str | None = None,
        queue: str | None = None,
        extra_args: tuple[str, ...] = (),
        app=None,
        **kwargs,
    ) -> None:
        self.hostname = hostname or f"worker-{uuid.uuid4().hex[:8]}@%h"
        self.queue = queue or settings.CELERY_TASK_DEFAULT_QUEUE
        self.concurrency = concurrency
        self.pool = pool
        self._app = app
        args = (
            "--pool", pool, "--concurrency", str(concurrency), "--hostname", self.hostname,
            "--without-mingle", "--without-gossip", "--queues", self.queue, *extra_args,
        )  # fmt: skip
        kwargs.setdefault("name", self.hostname.split("@")[0])
        super().__init__(args=args, **kwargs)

    @property
    def node_name(self) -> str:
        """The worker's node name as Celery reports it (``%h`` expanded)."""
        from celery.utils.nodenames import host_format

        return host_format(self.hostname)

    def ready(self) -> bool:
        """The worker answers a ping."""
        from celery import current_app

        app = self._app or current_app
        return bool(app.control.ping(destination=[self.node_name], timeout=0.5))


class WebProcess(ProjectProcess):
    """gunicorn (``bin/web``) on a free loopback port; ``url`` is where it answers.

    It serves with the settings module of the environment given (by default this
    process's), plain HTTP, and is ready once ``/healthz`` answers 200.
    """

    script = "web"

    def __init__(self, *, port: int | None = None, **kwargs) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"PORT": str(self.port), "GUNICORN_ACCESSLOG": "/dev/null", **kwargs.pop("env", {})}
        super().__init__(env=env, **kwargs)
        # gunicorn binds every interface by default (config/gunicorn.conf.py): tests, loopback.
        self.args = ("--bind", f"127.0.0.1:{self.port}", *self.args)

    def ready(self) -> bool:
        """``/healthz`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:  # noqa: S310
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    """Ask Linux to SIGTERM the process when the process that started it dies (a killed
    test run must not leave workers behind); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
