"""Run the cancel storm natively, start to finish: ``make loadtest`` calls this.

1. Makes a database of its own on the server of ``DATABASE_URL`` (from the environment or
   ``.env``) and migrates it, so the run touches none of your data; ``LOADTEST_DATABASE_URL``
   runs it in a database you name instead (then it removes the runs, signals, user and token
   it made there). A superuser ``loadtest`` and an API token for it are made in it.
2. Starts ``bin/web`` and ``bin/worker`` (``tasksignal.testing``) on a free loopback port,
   with production settings over plain HTTP, a queue and signal channel of their own, and
   the URLconf that mounts the revoke baseline (``loadtest/baseline.py``), and waits until
   a task goes through the API and the worker.
3. Runs ``bin/loadtest`` once per mode: ``cancel`` (the tasksignal storm), ``revoke`` (the
   same storm stopping its tasks with ``revoke(terminate=True)``: the baseline), and with
   ``peak`` a ramp of storms with more and more users until the honoured stops per second
   stop growing (or a step fails, or cancels of queued tasks carry it), then the baseline
   at the peak's users.
4. Measures, per run, the CPU of each part (web, worker, PostgreSQL, Redis, Locust: the
   PostgreSQL server's and Redis's whole processes, backends that came and went included, so
   run it on servers nothing else is using) and how many tasks were *running* at once (from
   the worker node's board, not the client's view).
5. Stops everything it started, whatever happened, drops its database, writes
   ``summary.json`` with the runs side by side, prints it, and exits with the storm's status.

Settings (environment variables; defaults in brackets): ``LOADTEST_DURATION`` [60s] per
mode, ``LOADTEST_USERS`` [56] storm users and ``LOADTEST_SIBLING_USERS`` [8] (one task in
flight each: 64 in all, as many as worker processes), ``LOADTEST_MODES`` [cancel,revoke],
``LOADTEST_WORKER_CONCURRENCY`` [64], ``LOADTEST_WEB_CONCURRENCY`` [2],
``LOADTEST_PEAK_USERS`` [64,96,128,160] and ``LOADTEST_PEAK_STEP`` [20s] for ``peak``,
``LOADTEST_REPORT_DIR`` [loadtest/reports], ``LOADTEST_DATABASE_URL``, plus the storm's own
(``bin/loadtest --help``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import environ
import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))
USERNAME = "loadtest"
LABELS = {"cancel": "storm", "revoke": "baseline"}
#: The share of a peak step's stops that must be of running tasks.
MIN_RUNNING_SHARE = 0.5
_STARTED = time.monotonic()


def say(message: str) -> None:
    """Print a progress line, with the seconds since the run began."""
    print(f"loadtest [{time.monotonic() - _STARTED:5.1f}s] {message}", flush=True)


class LoadTestError(RuntimeError):
    """The load test could not run (a server did not start, a command failed)."""


@dataclass(frozen=True)
class RunSettings:
    """What to start and how hard to push; read from ``LOADTEST_*`` variables."""

    duration: str
    users: int
    sibling_users: int
    modes: tuple[str, ...]
    worker_concurrency: int
    web_concurrency: int
    peak_users: tuple[int, ...]
    peak_step: str
    report_dir: Path

    @classmethod
    def from_env(cls, env: environ.Env) -> RunSettings:
        """Read the settings; raise :class:`LoadTestError` for a value that makes no sense."""
        try:
            modes = tuple(env.list("LOADTEST_MODES", default=["cancel", "revoke"]))
            values = {
                "duration": env.str("LOADTEST_DURATION", default="60s"),
                "users": env.int("LOADTEST_USERS", default=56),
                "sibling_users": env.int("LOADTEST_SIBLING_USERS", default=8),
                "modes": modes,
                "worker_concurrency": env.int("LOADTEST_WORKER_CONCURRENCY", default=64),
                "web_concurrency": env.int("LOADTEST_WEB_CONCURRENCY", default=2),
                "peak_users": tuple(
                    int(n)
                    for n in env.list("LOADTEST_PEAK_USERS", default=["64", "96", "128", "160"])
                ),
                "peak_step": env.str("LOADTEST_PEAK_STEP", default="20s"),
            }
        except (ValueError, environ.ImproperlyConfigured) as error:
            raise LoadTestError(str(error)) from None
        unknown = [mode for mode in modes if mode not in (*LABELS, "peak")]
        if unknown or not modes:
            raise LoadTestError(f"LOADTEST_MODES takes cancel, revoke and/or peak, not {unknown}")
        for name in ("duration", "peak_step"):
            if not re.fullmatch(r"(\d+[hms])+|\d+", values[name]):
                raise LoadTestError(f"{name} must look like 60s or 1m30s, not {values[name]!r}")
        report_dir = Path(env.str("LOADTEST_REPORT_DIR", default="loadtest/reports"))
        report_dir = report_dir if report_dir.is_absolute() else PROJECT_DIR / report_dir
        return cls(**values, report_dir=report_dir)


# -- the database ---------------------------------------------------------------------------
@contextlib.contextmanager
def own_database(env: environ.Env, run_id: str) -> Iterator[tuple[str, bool]]:
    """Yield ``(url, made)``: a database of the run's own (made, dropped afterwards), or the
    one ``LOADTEST_DATABASE_URL`` names (not made: the run cleans up after itself there)."""
    import psycopg

    given = env.str("LOADTEST_DATABASE_URL", default="")
    if given:
        yield given, False
        return
    server = env.str("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/postgres")
    parts = urlsplit(server)
    name = f"{parts.path.lstrip('/') or 'postgres'}_loadtest_{run_id}"[:63]
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as error:
        raise LoadTestError(
            f"cannot create a database for the run ({error}); set LOADTEST_DATABASE_URL to one "
            "it may use (it then removes what it made there)"
        ) from None
    try:
        yield urlunsplit(parts._replace(path=f"/{name}")), True
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(server, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django(database_url: str, run_id: str) -> dict[str, str]:
    """Set up Django on the run's database and environment; return the servers' environment.

    Production settings over plain HTTP on loopback, debug off, a queue and a signal channel
    unique to the run, the load test's URLconf, warnings only in the logs (a line per
    request or task is real CPU at a few hundred a second).
    """
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
    env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    env.update(
        {
            "DATABASE_URL": database_url,
            "DJANGO_ROOT_URLCONF": "loadtest.baseline",
            "DJANGO_DEBUG": "False",
            "DJANGO_SECURE_SSL_REDIRECT": "False",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "CELERY_TASK_DEFAULT_QUEUE": f"loadtest-{run_id}",
            "CELERY_BROKER_KEY_PREFIX": f"loadtest-{run_id}:",
            "TASKSIGNAL_CHANNEL": f"loadtest-{run_id}:tasksignal",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    for name, level in (
        ("GUNICORN_ACCESSLOG", "/dev/null"),
        ("CELERY_LOG_LEVEL", "WARNING"),
        ("DJANGO_LOG_LEVEL", "WARNING"),
    ):
        env.setdefault(name, level)
    os.environ.update(env)
    import django

    django.setup()
    return env


def make_token(run_id: str) -> str:
    """The load-test superuser (no password: it only ever uses tokens) and a fresh token."""
    from django.contrib.auth import get_user_model

    from tasksignal.auth import create_token

    user, _ = get_user_model().objects.get_or_create(
        username=USERNAME, defaults={"is_superuser": True, "is_staff": True}
    )
    if not user.has_usable_password() and not user.is_superuser:
        raise LoadTestError(f"user {USERNAME!r} exists and is not a superuser")
    return create_token(user, name=f"loadtest {run_id}")[1]


def clean_up(run_id: str, worker_name: str) -> str:
    """In a database the run did not make: remove its runs, their signals and its token."""
    from tasksignal.models import ApiToken, CeleryTaskSignal, TaskRun

    runs = TaskRun.objects.filter(worker__startswith=worker_name.split("@")[0])
    task_ids = list(runs.values_list("task_id", flat=True))
    signals = CeleryTaskSignal.objects.filter(task_id__in=task_ids).delete()[0]
    removed = runs.delete()[0]
    tokens = ApiToken.objects.filter(name=f"loadtest {run_id}").delete()[0]
    return f"removed {removed} runs, {signals} signals, {tokens} token"


# -- what the run costs -------------------------------------------------------------------------
def _cpu(process: psutil.Process) -> float:
    """CPU seconds of a process and of the children it has reaped."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _tree_cpu(root: psutil.Process) -> float:
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += _cpu(process)
    return total


def _server_process(port: int, name: str) -> psutil.Process | None:
    """The local process listening on ``port`` (its parent, if that has the same name)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            with contextlib.suppress(psutil.Error, TypeError):
                process = psutil.Process(connection.pid)
                parent = process.parent()
                if parent is not None and name in parent.name():
                    return parent
                return process
    return None


class CpuMeter:
    """CPU seconds of each part of the system under test, read from the operating system.

    ``web`` and ``worker`` are their whole process trees, children that exited included
    (their parent reaped them); ``postgres`` and ``redis`` the servers' whole process trees
    (PostgreSQL's backends that came and went are in the postmaster's reaped-children time),
    when they run on this machine; ``locust`` the load generator's (this process's children).
    """

    def __init__(self, web, worker, env: Mapping[str, str]) -> None:
        self.web, self.worker = web, worker
        database, redis_url = urlsplit(env["DATABASE_URL"]), urlsplit(env.get("REDIS_URL", ""))
        self.postgres = _server_process(database.port or 5432, "postgres")
        self.redis = _server_process(redis_url.port or 6379, "redis") if redis_url.port else None

    def read(self) -> dict[str, float]:
        """CPU seconds used so far by each part (``None`` for a server not on this machine)."""
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        totals = {
            "web": _tree_cpu(psutil.Process(self.web.process.pid)),
            "worker": _tree_cpu(psutil.Process(self.worker.process.pid)),
            "locust": usage.ru_utime + usage.ru_stime,
        }
        for name in ("postgres", "redis"):
            server = getattr(self, name)
            totals[name] = _tree_cpu(server) if server is not None else None
        return totals

    @staticmethod
    def used(before: dict, after: dict) -> dict[str, float | None]:
        """CPU seconds each part used between two readings."""
        return {
            name: None if after[name] is None else round(max(after[name] - before[name], 0.0), 1)
            for name in after
        }


class RunningSampler:
    """How many tasks the worker node runs at once, sampled twice a second from its board."""

    def __init__(self, worker_pid: int) -> None:
        from tasksignal.board import Board, board_path

        self._board = Board.open(board_path(worker_pid))
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        if self._board is not None:
            self._board.close()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            if self._board is not None:
                self._samples.append(self._board.live_runs())

    def summary(self) -> dict[str, float]:
        """Mean and max of the samples."""
        samples = self._samples or [0]
        return {"mean": round(sum(samples) / len(samples), 1), "max": max(samples)}


# -- the storm --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The servers under test, and how to reach and meter them."""

    settings: RunSettings
    env: Mapping[str, str]
    base: str
    token: str
    meter: CpuMeter
    worker_pid: int

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """One JSON request to the API under test; raises ``OSError`` or ``ValueError``."""
        request = urllib.request.Request(  # noqa: S310 - the local server we started
            f"{self.base}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.loads(response.read() or b"null")

    def smoke(self) -> None:
        """A task through the API and the worker, or :class:`LoadTestError` within 60 s."""
        deadline, last = time.monotonic() + 60, "no answer"
        body = {"task": "demo.tasks.add", "kwargs": {"x": 2, "y": 3}}
        while time.monotonic() < deadline:
            try:
                task_id = self.call("POST", "/api/tasks/", body)["id"]
                if self.call("GET", f"/api/tasks/{task_id}/?wait=20").get("state") == "SUCCESS":
                    return
            except (OSError, ValueError, KeyError) as error:
                last = str(error)
            time.sleep(0.5)
        raise LoadTestError(f"no task went through the API and the worker within 60 s ({last})")

    def storm(self, mode: str, label: str, users: int, duration: str) -> dict | None:
        """Run ``bin/loadtest`` once under the CPU meter and the running sampler.

        Returns its summary with ``exit_code``, ``cpu_seconds``, ``cpu_ms_per_stop`` (and by
        part) and ``running``, or ``None`` when it wrote none.
        """
        settings = self.settings
        storm_env = {
            **self.env,
            "LOADTEST_MODE": mode,
            "LOADTEST_LABEL": label,
            "LOADTEST_HOST": self.base,
            "LOADTEST_TOKEN": self.token,
            "LOADTEST_REPORT_DIR": str(settings.report_dir),
            "LOADTEST_DURATION": duration,
            "LOADTEST_USERS": str(users),
            "LOADTEST_SIBLING_USERS": str(settings.sibling_users),
        }
        # The storm's interrupt deadline builds on the grace the worker really uses.
        storm_env.setdefault(
            "LOADTEST_CANCEL_GRACE", self.env.get("TASKSIGNAL_CANCEL_GRACE", "1.0")
        )
        say(f"{label}: {mode} storm, {users} + {settings.sibling_users} users, {duration}")
        before = self.meter.read()
        with RunningSampler(self.worker_pid) as running:
            code = run_locust(storm_env)
        cpu = CpuMeter.used(before, self.meter.read())
        try:
            path = settings.report_dir / f"{label}-summary.json"
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        honoured = summary["counts"]["honoured"]
        total = sum(seconds for seconds in cpu.values() if seconds is not None)
        summary["exit_code"] = code
        summary["cpu_seconds"] = cpu
        summary["cpu_ms_per_stop"] = round(1000 * total / honoured, 1) if honoured else None
        summary["cpu_ms_per_stop_by_part"] = {
            part: None if seconds is None or not honoured else round(1000 * seconds / honoured, 2)
            for part, seconds in cpu.items()
        }
        summary["running"] = running.summary()
        say(f"{label}: {summary['honoured_per_s']} honoured stops/s, exit code {code}")
        return summary

    def find_peak(self) -> tuple[list[dict], dict | None]:
        """Storms with more and more users; return every step's summary and the peak.

        A step counts when every cancel was honoured, no sibling was harmed and at least
        :data:`MIN_RUNNING_SHARE` of its stops were of running tasks (cancels of queued
        tasks are cheap and must not carry the figure). The ramp ends at the first step
        that does not count or that adds less than 5 % to the best; the peak is the best
        step that counted.
        """
        steps: list[dict] = []
        best: dict | None = None
        for users in self.settings.peak_users:
            summary = self.storm("cancel", f"peak-{users}", users, self.settings.peak_step)
            if summary is None:
                break
            steps.append(summary)
            if not counts_for_peak(summary):
                break
            if best is not None and summary["honoured_per_s"] < 1.05 * best["honoured_per_s"]:
                break
            best = summary
        return steps, best


def counts_for_peak(summary: dict) -> bool:
    """Whether a storm step may stand as the peak: all honoured, no harm, mostly running.

    >>> counts_for_peak({"counts": {"unhonoured": 0, "siblings_failed": 0},
    ...                  "running_share": 0.7})
    True
    >>> counts_for_peak({"counts": {"unhonoured": 0, "siblings_failed": 0},
    ...                  "running_share": 0.2})
    False
    """
    counts = summary["counts"]
    return (
        counts["unhonoured"] == 0
        and counts["siblings_failed"] == 0
        and (summary.get("running_share") or 0) >= MIN_RUNNING_SHARE
    )


def run_locust(storm_env: Mapping[str, str]) -> int:
    """``bin/loadtest`` with ``storm_env``, niced; return its exit code.

    The load generator shares the machine with the system under test: it must not take the
    CPU the worker needs to stop tasks, or the latencies measured are its own queueing.
    """
    niceness = int(storm_env.get("LOADTEST_CLIENT_NICE", "10"))
    process = subprocess.Popen(
        [str(PROJECT_DIR / "bin" / "loadtest")],
        cwd=PROJECT_DIR,
        env=dict(storm_env),
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.nice(niceness),
    )
    try:
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted: give locust the chance to write its reports
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                process.kill()


def format_table(document: dict[str, Any]) -> str:
    """The storm and the baseline side by side, as text."""
    storm_run = document.get("tasksignal") or {}
    baseline = document.get("baseline_revoke") or {}
    rows = [("", "tasksignal cancel", "revoke(terminate) baseline")]

    def both(label: str, key) -> None:
        rows.append(
            (label, key(storm_run) if storm_run else "-", key(baseline) if baseline else "-")
        )

    def latency(summary: dict, step: str) -> str:
        row = summary.get("outcomes", {}).get(step)
        if row is None:
            return "-"
        return f"n={row['count']} p50 {row['p50_ms']:.0f} / p99 {row['p99_ms']:.0f} ms"

    both("users", lambda s: str(s["users"]))
    both("stops honoured / s", lambda s: str(s["honoured_per_s"]))
    for name in ("started", "honoured", "unhonoured", "cutoff", "siblings_ok", "siblings_failed"):
        both(name.replace("_", " "), lambda s, n=name: str(s["counts"][n]))
    both("running at once (mean/max)", lambda s: "{mean} / {max}".format(**s["running"]))
    both("cancels hitting running tasks", lambda s: str(s.get("running_share")))
    both("HTTP requests per flow", lambda s: str(s["requests_per_flow"]))
    both("CPU ms per stop", lambda s: str(s.get("cpu_ms_per_stop")))
    for step in sorted({*storm_run.get("outcomes", {}), *baseline.get("outcomes", {})}):
        both(f"{step} latency", lambda s, step=step: latency(s, step))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    lines += [f"FAIL: {reason}" for reason in storm_run.get("gate", [])]
    peak = document.get("peak")
    if peak:
        lines.append(
            f"peak: {peak['honoured_per_s']} stops/s with {peak['users']} users, "
            f"{peak['running_share']} of them of running tasks, "
            f"{peak['cpu_ms_per_stop']} ms CPU per stop"
        )
    return "\n".join(lines)


def run_modes(target: Target) -> dict[str, Any]:
    """The storms ``LOADTEST_MODES`` asks for, in order: peak, cancel, revoke.

    After a peak search the baseline runs with the peak's users, so the two compare at the
    same load.
    """
    settings, document = target.settings, {}
    baseline_users = settings.users
    if "peak" in settings.modes:
        document["peak_steps"], document["peak"] = target.find_peak()
        if document["peak"]:
            baseline_users = document["peak"]["users"] - settings.sibling_users
    if "cancel" in settings.modes:
        document["tasksignal"] = target.storm("cancel", "storm", settings.users, settings.duration)
    if "revoke" in settings.modes or "peak" in settings.modes:
        time.sleep(2.0)  # the previous storm's last tasks finish being stopped
        document["baseline_revoke"] = target.storm(
            "revoke", "baseline", baseline_users, settings.duration
        )
    return document


def exit_code(document: dict[str, Any]) -> int:
    """The storm's exit code (the peak's best step when only peak ran); never the baseline's."""
    judged = document.get("tasksignal") or document.get("peak")
    if judged is None:
        return 1
    return judged["exit_code"]


def main() -> int:
    """Run the whole load test; return the exit code."""
    env = environ.Env()
    env.read_env(PROJECT_DIR / ".env")
    try:
        settings = RunSettings.from_env(env)
    except LoadTestError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    logs = settings.report_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in settings.report_dir.glob("*-summary.json"):
        stale.unlink()
    run_id = secrets.token_hex(4)
    document: dict[str, Any] = {
        "settings": {
            **settings.__dict__,
            "report_dir": str(settings.report_dir),
            "cpus": os.cpu_count(),
        }
    }

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with own_database(env, run_id) as (database_url, made):
            database = urlsplit(database_url).path.lstrip("/")
            say(f"database {database} ({'its own' if made else 'given'}); migrating")
            server_env = setup_django(database_url, run_id)
            from django.core.management import call_command

            from tasksignal.testing import WebProcess, WorkerProcess

            call_command("migrate", "--noinput", verbosity=0)
            token = make_token(run_id)
            worker = WorkerProcess(
                concurrency=settings.worker_concurrency,
                hostname=f"loadtest-{run_id}@%h",
                env=server_env,
                log_path=logs / "worker.log",
                ready_timeout=90,
            )
            web = WebProcess(
                env={**server_env, "WEB_CONCURRENCY": str(settings.web_concurrency)},
                log_path=logs / "web.log",
                ready_timeout=60,
            )
            with worker, web:
                say(
                    f"web on {web.url} ({settings.web_concurrency} processes), worker with "
                    f"{settings.worker_concurrency} processes; logs in {logs}"
                )
                meter = CpuMeter(web, worker, server_env)
                target = Target(settings, server_env, web.url, token, meter, worker.process.pid)
                target.smoke()
                say("a task went through the API and the worker: ready")
                document.update(run_modes(target))
            say("stopped web and worker")
            if not made:
                say(clean_up(run_id, worker.hostname))
    except LoadTestError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"loadtest: interrupted ({interrupt}); all it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    path = settings.report_dir / "summary.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\n{format_table(document)}\nsummary: {path}")
    return exit_code(document)


if __name__ == "__main__":
    sys.exit(main())
