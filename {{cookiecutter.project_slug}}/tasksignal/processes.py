"""Run a command alone in its own process group: start until ready, stop as a platform does.

The one way this project runs its own processes, for its tests, benchmarks and load test
(through :mod:`tasksignal.testing`) and for the template that generated it, which loads
this file from a fresh bake to start the bake's Procfile processes. So it imports no
Django and nothing of the project: the standard library, psutil, and honcho's Procfile
parser (honcho runs ``make dev``: the same parser reads the same file)::

    web = ProcessGroup.from_procfile(
        "web", Path("Procfile"), env=os.environ, log_path=Path("/tmp/web.log"),
        ready=answers("http://127.0.0.1:8000/healthz"),
    )
    with web:                 # started, and ready: /healthz answered 200
        ...
    # left: SIGTERM to the main process (a warm shutdown), then SIGKILL to the whole group

A process group, so that nothing it starts (prefork children, gunicorn workers, a shell's
commands) outlives it: whatever is still alive once the main process has exited, or
after ``stop_timeout``, is killed with the group.
"""

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

import psutil

#: A readiness check: asked again and again while the process starts, until it says True.
ReadyCheck = Callable[["ProcessGroup"], bool]

#: What Celery logs once a worker consumes: ``celery@<host> ready.``
WORKER_READY = r"celery@\S+ ready\."


class ProcessGroup:
    """``command`` run in ``cwd`` with exactly ``env``, its output in ``log_path``.

    ``ready`` tells when it serves (:func:`answers`, :func:`logs`); without one, it is
    ready once started. :meth:`start` raises ``RuntimeError`` with the end of the log when
    the process exits first or is not ready within ``ready_timeout`` (it is killed then).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path,
        ready: ReadyCheck | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        name: str = "",
    ) -> None:
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(env)
        self.log_path = log_path
        self.ready_check = ready
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.name = name or Path(self.command[0]).name
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def from_procfile(cls, process_type: str, procfile: Path, **kwargs: Any) -> Self:
        """The Procfile's ``process_type``, run by bash in the Procfile's folder, as a platform
        runs it (bash runs a lone command with ``exec``: the command is the main process);
        ``kwargs`` are the constructor's.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     procfile = Path(folder) / "Procfile"
        ...     _ = procfile.write_text("web: bin/web --x\\nworker: bin/worker\\n")
        ...     ProcessGroup.from_procfile(
        ...         "web", procfile, env={}, log_path=Path(folder) / "web.log"
        ...     ).command
        ['bash', '-c', 'bin/web --x']
        """
        command = procfile_commands(procfile)[process_type]
        kwargs.setdefault("name", process_type)
        kwargs.setdefault("cwd", procfile.parent)
        return cls(["bash", "-c", command], **kwargs)

    def ready(self) -> bool:
        """Whether the process serves yet (asked repeatedly while it starts)."""
        return self.ready_check is None or self.ready_check(self)

    def start(self) -> Self:
        """Start the process and wait until :meth:`ready`; return ``self``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            self.wait_until(lambda process: process.ready(), self.ready_timeout, "ready")
        except RuntimeError:
            self.kill()  # never left running behind a failed start
            raise
        return self

    def wait_until(self, check: ReadyCheck, timeout: float, what: str = "ready") -> None:
        """Ask ``check`` every 0.1 s until it holds; ``RuntimeError`` with the end of the log
        when the process exits first or ``timeout`` seconds pass (``what`` names the wait).
        A check that raises counts as not yet: what it talks to may be restarting."""
        process = self._started
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {process.returncode} before it was {what}: "
                    f"{self.log_tail()}"
                )
            try:
                if check(self):
                    return
            except Exception as error:  # restarting, see the docstring: not yet
                last_error = f" (last check: {error})"
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} was not {what} within {timeout}s{last_error}: {self.log_tail()}"
        )

    @property
    def pid(self) -> int:
        """The main process, whose pid is also the process group's id."""
        return self._started.pid

    def child_pids(self) -> list[int]:
        """The processes the main process started (prefork pool, gunicorn workers)."""
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def group_members(self) -> list[int]:
        """The pids still alive in the process group, zombies left out."""
        members = []
        for process in psutil.process_iter(["pid", "status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if (
                    os.getpgid(process.info["pid"]) == self.pid
                    and process.info["status"] != psutil.STATUS_ZOMBIE
                ):
                    members.append(process.info["pid"])
        return members

    def terminate(self, timeout: float | None = None) -> int | None:
        """SIGTERM the main process only, as a platform does; return its exit code once it
        exits, ``None`` if it is still running after ``timeout`` (default ``stop_timeout``)."""
        process = self._started
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_for_group_exit(self, timeout: float = 10.0) -> list[int]:
        """Wait until the process group is empty; return the pids still in it after ``timeout``."""
        deadline = time.monotonic() + timeout
        members = self.group_members()
        while members and time.monotonic() < deadline:
            time.sleep(0.2)
            members = self.group_members()
        return members

    def stop(self) -> int | None:
        """Warm shutdown (:meth:`terminate`), then SIGKILL whatever is left of the group;
        return the main process's exit code. Safe to call twice, or on a failed start."""
        if self.process is None:
            return None
        self.terminate()
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything it started, as a crash would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._started.wait(10)

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr together)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's log, for failure messages."""
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process

    def __enter__(self) -> Self:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def answers(url: str) -> ReadyCheck:
    """A readiness check: ``url`` answers 200.

    >>> answers(f"http://127.0.0.1:{free_port()}/healthz")(None)  # nothing listens there
    False
    """

    def check(_process: ProcessGroup | None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def logs(pattern: str) -> ReadyCheck:
    """A readiness check: the process's log matches the regular expression ``pattern``
    (:data:`WORKER_READY` for a Celery worker)."""
    compiled = re.compile(pattern)
    return lambda process: compiled.search(process.log()) is not None


def procfile_commands(procfile: Path) -> dict[str, str]:
    """The process types of a Procfile and their commands, read by honcho's parser.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     procfile = Path(folder) / "Procfile"
    ...     _ = procfile.write_text("# comment\\nweb: bin/web\\n\\nworker: bin/worker --x\\n")
    ...     procfile_commands(procfile)
    {'web': 'bin/web', 'worker': 'bin/worker --x'}
    """
    from honcho.environ import parse_procfile  # a dev tool: only who reads a Procfile needs it

    return dict(parse_procfile(procfile.read_text(encoding="utf-8")).processes)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    >>> 1024 <= free_port() <= 65535
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the process when the process that started it dies (a killed
    test run must not leave workers behind); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
