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

Servers of a test's own, for tests that stop and restart them (never the shared ones)::

    with RedisServer(tmp_path) as redis_server, PostgresServer() as postgres:
        redis_server.restart(down_for=2.0)
        postgres.restart(down_for=2.0)

and a proxy in front of one, for a network fault at an exact moment (:class:`TcpProxy`).
"""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from django.conf import settings

from tasksignal.processes import ProcessGroup, answers, free_port

if TYPE_CHECKING:
    from celery import Celery

PROJECT_DIR = Path(__file__).resolve().parent.parent


class ProjectProcess(ProcessGroup):
    """A ``bin/<script>`` subprocess of this project, alone in its process group
    (:class:`~tasksignal.processes.ProcessGroup`).

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
        name = name or f"{self.script}-{uuid.uuid4().hex[:8]}"
        environment = {
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
        super().__init__(
            [str(PROJECT_DIR / "bin" / self.script), *args],
            cwd=PROJECT_DIR,
            env=environment,
            log_path=log_path or Path(tempfile.gettempdir()) / f"{name}.log",
            ready_timeout=ready_timeout,
            stop_timeout=stop_timeout,
            name=name,
        )

    def ready(self) -> bool:
        """Whether the process serves yet (asked repeatedly while it starts)."""
        raise NotImplementedError


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
        app: "Celery | None" = None,
        **kwargs: Any,
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

    def __init__(self, *, port: int | None = None, **kwargs: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"PORT": str(self.port), "GUNICORN_ACCESSLOG": "/dev/null", **kwargs.pop("env", {})}
        # gunicorn binds every interface by default (config/gunicorn.conf.py): tests, loopback.
        args = ("--bind", f"127.0.0.1:{self.port}", *kwargs.pop("args", ()))
        super().__init__(args=args, env=env, **kwargs)

    def ready(self) -> bool:
        """``/healthz`` answers 200."""
        return answers(f"{self.url}/healthz")(self)


class ThrowawayServer:
    """A server of the caller's own on a spare loopback port, removed when it stops.

    ``restart(down_for)`` stops it, keeps it down that long and starts it again on the
    same port with the same data: what a crash-and-restart looks like to its clients.
    """

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = Path(folder)

    def start(self) -> Self:
        """Start the server and wait until it answers; return ``self``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (its data stays until :meth:`remove`)."""
        raise NotImplementedError

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def remove(self) -> None:
        """Stop if running and delete the server's data."""
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class RedisServer(ThrowawayServer):
    """A private ``redis-server``; ``persistent`` keeps an append-only file across restarts
    (as a production Redis does), otherwise a restart loses everything (as ``--save ""``)."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        super().__init__(Path(folder) / "redis")
        self.persistent = persistent
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start ``redis-server`` and wait until it answers PING."""
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file first), SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class PostgresServer(ThrowawayServer):
    """A throwaway PostgreSQL cluster (``initdb``, ``pg_ctl``), trust authentication, user
    ``postgres``; run as the ``postgres`` system user when this process is root (the server
    refuses to run as root). ``url`` is the ``postgres`` database's.

    Its data lives in a folder of its own under the system's temporary folder (which the
    ``postgres`` user can reach, unlike a test's private ``tmp_path``).
    """

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="tasksignal-postgres-")))
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self._bin = _postgres_bin()
        self._initialised = False

    def _run(self, *command: str) -> None:
        prefix = ("runuser", "-u", "postgres", "--") if os.geteuid() == 0 else ()
        subprocess.run(
            [*prefix, *command], check=True, capture_output=True, text=True, cwd=self.folder
        )

    def start(self) -> Self:
        """``initdb`` (the first time) and ``pg_ctl start``; wait until it accepts sessions."""
        if not self._initialised:
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres", "postgres")
            self._run(
                f"{self._bin}/initdb", "-D", str(self.folder / "data"), "-U", "postgres",
                "--auth=trust", "--no-sync", "-E", "UTF8",
            )  # fmt: skip
            self._initialised = True
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
            "-c max_connections=200"
        )
        self._run(
            f"{self._bin}/pg_ctl", "-D", str(self.folder / "data"), "-o", options,
            "-l", str(self.folder / "server.log"), "-w", "-t", "30", "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are cut, as in a restart."""
        if self._initialised:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(
                    f"{self._bin}/pg_ctl", "-D", str(self.folder / "data"), "-m", "fast",
                    "-w", "stop",
                )  # fmt: skip


class TcpProxy:
    """A TCP proxy on a spare loopback port in front of the loopback server of ``upstream``
    (its URL); ``url`` is the same URL with the proxy's port.

    Subclasses decide what passes, chunk by chunk as it arrives: :meth:`request` (client
    to server) and :meth:`reply` (server to client) return ``False`` to hold a chunk back,
    with everything after it in that direction of that connection; :meth:`replied` sees
    each reply once it passed. :meth:`cut` closes every connection and refuses new ones,
    as a server that went away, until :meth:`restore`::

        with TcpProxy(redis_server.url) as proxy:
            client = redis.Redis.from_url(proxy.url)
            proxy.cut()  # the client's next command fails with a connection error
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_port = parts.port
        self.port = free_port()
        self.url = parts._replace(netloc=f"{parts.netloc.rpartition(':')[0]}:{self.port}").geturl()
        self.refusing = False
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def request(self, data: bytes) -> bool:
        """Whether ``data``, sent by a client, passes to the server (by default: yes)."""
        return True

    def reply(self, data: bytes) -> bool:
        """Whether ``data``, sent by the server, passes to its client (by default: yes)."""
        return True

    def replied(self, data: bytes) -> None:
        """Called once ``data`` passed to a client."""

    def cut(self) -> None:
        """Close every connection; refuse new ones until :meth:`restore`."""
        self.refusing = True
        with self._lock:
            connections, self._connections = self._connections, []
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.close()

    def restore(self) -> None:
        """Accept connections again."""
        self.refusing = False

    def close(self) -> None:
        """Close every connection and stop listening."""
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _address = self._listener.accept()
                if self.refusing:
                    client.close()
                    continue
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
                with self._lock:
                    self._connections += [client, server]
                for source, target, passes, passed in (
                    (client, server, self.request, None),
                    (server, client, self.reply, self.replied),
                ):
                    threading.Thread(
                        target=self._pipe, args=(source, target, passes, passed), daemon=True
                    ).start()

    @staticmethod
    def _pipe(
        source: socket.socket,
        target: socket.socket,
        passes: Callable[[bytes], bool],
        passed: Callable[[bytes], None] | None,
    ) -> None:
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and passes(data):
                target.sendall(data)
                if passed is not None:
                    passed(data)


def _postgres_bin() -> str:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, or Debian's newest version."""
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(found).parent)
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if not versions:
        raise RuntimeError("no pg_ctl here (Debian: apt-get install postgresql)")
    return str(Path(versions[-1]).parent)


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
            if index is None:
                continue
            run = board.read_run(index, task_id)
            if run is not None and board.runs(index, task_id, run.pid):
                return run.pid
        finally:
            board.close()
    return None
