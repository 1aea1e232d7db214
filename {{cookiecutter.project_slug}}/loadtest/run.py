"""Run the cancel storm natively, start to finish: ``make loadtest`` calls this.

1. Migrates the database (``DATABASE_URL``, from the environment or ``.env``), creates the
   ``loadtest`` superuser if missing and an API token for it (unless ``LOADTEST_TOKEN`` is
   given).
2. Starts the ``web`` and ``worker`` commands of the ``Procfile`` (``bin/web``, ``bin/worker``)
   on a free port, each in its own process group, with production settings over plain HTTP,
   a queue and a signal channel of their own (so no other worker on the same Redis takes the
   storm's tasks), and waits until a task goes through the API end to end.
3. Runs ``bin/loadtest`` once per mode: the tasksignal storm (``cancel``), then the same storm
   stopping its tasks with ``revoke(terminate=True)`` (``revoke``, the baseline).
4. Stops everything it started, whatever happened (SIGTERM, then SIGKILL for the whole
   process group), purges what is left in its queue, writes ``summary.json`` with both runs
   side by side, prints it, and exits with the storm's exit code: the baseline is reported,
   never gated on.

Settings (environment variables; defaults in brackets):
``LOADTEST_DURATION`` [60s] per mode, ``LOADTEST_USERS`` [64] storm users (one task in flight
each), ``LOADTEST_SIBLING_USERS`` [8], ``LOADTEST_MODES`` [cancel,revoke],
``LOADTEST_WORKER_CONCURRENCY`` [24] prefork processes, ``LOADTEST_WEB_CONCURRENCY`` [3] and
``LOADTEST_GUNICORN_THREADS`` [4], ``LOADTEST_PROCESSES`` [1] Locust processes,
``LOADTEST_REPORT_DIR`` [loadtest/reports], ``LOADTEST_PORT`` [a free one], plus the storm's
own (``loadtest/locustfile.py``).

Why 24 worker processes: the storm's tasks sleep, so CPUs are not the limit; PostgreSQL
connections are. Each prefork child holds up to three (the task, and tasksignal's listener
and writer threads), so 24 children need about 72 of PostgreSQL's default 100, leaving room
for gunicorn (``WEB_CONCURRENCY`` x ``GUNICORN_THREADS``) and the worker's main process.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
USERNAME = "loadtest"
LABELS = {"cancel": "storm", "revoke": "baseline"}


_STARTED = time.monotonic()


def say(message: str) -> None:
    """Print a progress line, with the seconds since the run began."""
    print(f"loadtest [{time.monotonic() - _STARTED:5.1f}s] {message}", flush=True)


class LoadTestError(RuntimeError):
    """The load test could not run (a server did not start, a command failed)."""


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise LoadTestError(f"{name} must be a whole number, not {value!r}")
    return int(value)


@dataclass(frozen=True)
class RunSettings:
    """What to start and how hard to push; read from ``LOADTEST_*`` variables."""

    duration: str
    users: int
    sibling_users: int
    modes: tuple[str, ...]
    worker_concurrency: int
    web_concurrency: int
    gunicorn_threads: int
    processes: int
    report_dir: Path
    port: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunSettings:
        """Read the settings, raising :class:`LoadTestError` for a value that makes no sense."""
        modes = tuple(
            mode.strip()
            for mode in (environ.get("LOADTEST_MODES") or "cancel,revoke").split(",")
            if mode.strip()
        )
        unknown = [mode for mode in modes if mode not in LABELS]
        if unknown or not modes:
            raise LoadTestError(f"LOADTEST_MODES takes cancel and/or revoke, not {unknown}")
        duration = environ.get("LOADTEST_DURATION", "").strip() or "60s"
        if not re.fullmatch(r"(\d+[hms])+|\d+", duration):
            raise LoadTestError(f"LOADTEST_DURATION must look like 60s or 1m30s, not {duration!r}")
        report_dir = Path(environ.get("LOADTEST_REPORT_DIR", "").strip() or "loadtest/reports")
        return cls(
            duration=duration,
            users=_int(environ, "LOADTEST_USERS", 64),
            sibling_users=_int(environ, "LOADTEST_SIBLING_USERS", 8),
            modes=modes,
            worker_concurrency=_int(environ, "LOADTEST_WORKER_CONCURRENCY", 24),
            web_concurrency=_int(environ, "LOADTEST_WEB_CONCURRENCY", 3),
            gunicorn_threads=_int(environ, "LOADTEST_GUNICORN_THREADS", 4),
            processes=_int(environ, "LOADTEST_PROCESSES", 1),
            report_dir=report_dir if report_dir.is_absolute() else PROJECT_DIR / report_dir,
            port=_int(environ, "LOADTEST_PORT", 0) or free_port(),
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_environment(settings: RunSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process the run starts.

    Production settings over plain HTTP on loopback, debug off (debug keeps every SQL query
    in memory), this interpreter's scripts first on ``PATH``, and a queue and signal
    channel unique to this run.
    """
    run_id = secrets.token_hex(4)
    env = dict(environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
    env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    hosts = [h for h in env.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    env["DJANGO_ALLOWED_HOSTS"] = ",".join([*hosts, "127.0.0.1", "localhost"])
    env.update(
        {
            "DJANGO_DEBUG": "False",
            "DJANGO_SECURE_SSL_REDIRECT": "False",
            "PORT": str(settings.port),
            "WEB_CONCURRENCY": str(settings.web_concurrency),
            "GUNICORN_THREADS": str(settings.gunicorn_threads),
            "CELERY_WORKER_CONCURRENCY": str(settings.worker_concurrency),
            "CELERY_TASK_DEFAULT_QUEUE": f"loadtest-{run_id}",
            "TASKSIGNAL_CHANNEL": f"loadtest-{run_id}:tasksignal",
            "TASKSIGNAL_API_BASELINE_REVOKE": "True",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # A line per request or task is real CPU at a few hundred a second: warnings only.
    env.setdefault("GUNICORN_ACCESSLOG", "/dev/null")
    env.setdefault("CELERY_LOG_LEVEL", "WARNING")
    env.setdefault("DJANGO_LOG_LEVEL", "WARNING")
    env["LOADTEST_RUN_ID"] = run_id
    return env


def manage(
    env: Mapping[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py`` with ``args``; raise :class:`LoadTestError` if it fails and ``check``."""
    completed = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and completed.returncode != 0:
        raise LoadTestError(
            f"manage.py {' '.join(args)} exited {completed.returncode}:\n"
            f"{completed.stdout}{completed.stderr}"
        )
    return completed


def create_token(env: Mapping[str, str]) -> str:
    """Create the load-test superuser if missing and a fresh API token for it; return the token."""
    # No DJANGO_SUPERUSER_PASSWORD: the user gets an unusable password, only tokens work.
    created = manage(
        env,
        "createsuperuser",
        "--noinput",
        "--username",
        USERNAME,
        "--email",
        f"{USERNAME}@example.com",
        check=False,
    )
    output = created.stdout + created.stderr
    if created.returncode != 0 and "already taken" not in output:
        raise LoadTestError(f"could not create the {USERNAME} user:\n{output}")
    name = f"loadtest {env['LOADTEST_RUN_ID']}"
    lines = manage(env, "create_api_token", USERNAME, "--name", name).stdout.split()
    if not lines:
        raise LoadTestError("create_api_token printed no token")
    return lines[-1]


def procfile_commands(path: Path) -> dict[str, str]:
    r"""The process types of a Procfile and their commands.

    >>> import tempfile
    >>> procfile = Path(tempfile.mkdtemp()) / "Procfile"
    >>> _ = procfile.write_text("# processes\nweb: bin/web\nworker: bin/worker -Q a\n")
    >>> procfile_commands(procfile)
    {'web': 'bin/web', 'worker': 'bin/worker -Q a'}
    """
    commands = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(\S.*)$", line.strip())
        if match and not line.lstrip().startswith("#"):
            commands[match[1]] = match[2].strip()
    return commands


@dataclass
class Service:
    """A Procfile process started by the run, alone in its own process group."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the service's log, for error messages."""
        with suppress(OSError):
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the main process (warm shutdown), then SIGKILL whatever is left of the group."""
        if self.alive():
            with suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        # Children (prefork pool, gunicorn workers) share the group: nothing may outlive us.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def start_service(name: str, command: str, env: Mapping[str, str], log_dir: Path) -> Service:
    """Start a Procfile command with bash, as a platform would, in a new process group."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=PROJECT_DIR,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name=name, process=process, log_path=log_path)


def _process_seconds(process: Any) -> float:
    """CPU seconds of a process and of its children it has waited for."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def cpu_snapshot(services: list[Service], database: str) -> dict[str, float]:
    """CPU seconds used so far by each part of the system under test.

    ``web`` and ``worker`` are their whole process groups (exited children included once
    their parent reaped them), ``locust`` is this script's waited-for children, and
    ``postgres`` the server processes connected to ``database``, when PostgreSQL runs on
    this machine (a backend that disconnected takes its time with it).
    """
    totals = {service.name: 0.0 for service in services}
    totals["postgres"] = 0.0
    groups = {service.process.pid: service.name for service in services}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    totals["locust"] = usage.ru_utime + usage.ru_stime
    for process in psutil.process_iter(["pid", "cmdline"]):
        with suppress(psutil.Error, OSError):
            group = groups.get(os.getpgid(process.pid))
            if group is not None:
                totals[group] += _process_seconds(process)
            elif database and any(
                part.startswith("postgres:") and f" {database} " in f" {part} "
                for part in process.info["cmdline"] or ()
            ):
                totals["postgres"] += _process_seconds(process)
    return totals


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each part used between two snapshots (never negative)."""
    return {name: round(max(after[name] - before.get(name, 0.0), 0.0), 1) for name in after}


def setting(env: Mapping[str, str], name: str) -> str:
    """A setting as the project's processes see it: the environment's, else ``.env``'s."""
    if name in env:
        return env[name]
    dotenv = PROJECT_DIR / ".env"
    if dotenv.is_file():
        for line in dotenv.read_text(encoding="utf-8").splitlines():
            key, _, value = line.strip().removeprefix("export ").partition("=")
            if key.strip() == name:
                return value.strip().strip("'\"")
    return ""


def database_name(env: Mapping[str, str]) -> str:
    """The name of the database in ``DATABASE_URL``, for finding its server processes."""
    return urlsplit(setting(env, "DATABASE_URL")).path.lstrip("/")


def api(base: str, token: str, method: str, path: str, body: dict | None = None) -> Any:
    """One JSON request to the API under test; raises ``OSError`` or ``ValueError`` on failure."""
    request = urllib.request.Request(  # noqa: S310 - the URL is the local server we started
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read() or b"null")


def wait_until_ready(base: str, token: str, services: list[Service], timeout: float = 90.0) -> None:
    """Wait for ``/healthz``, then for a task to run through the API and the worker."""
    deadline = time.monotonic() + timeout
    task_id, last_error = None, "no answer yet"
    while time.monotonic() < deadline:
        for service in services:
            if not service.alive():
                raise LoadTestError(
                    f"{service.name} exited with {service.process.returncode} while starting:\n"
                    f"{service.log_tail()}"
                )
        try:
            if task_id is None:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5):  # noqa: S310
                    pass
                body = {"task": "demo.tasks.add", "kwargs": {"x": 2, "y": 3}}
                task_id = api(base, token, "POST", "/api/tasks/", body)["id"]
            state = api(base, token, "GET", f"/api/tasks/{task_id}/")
            if state.get("state") == "SUCCESS":
                return
            last_error = f"smoke task {task_id} is {state.get('state')}"
        except (OSError, ValueError, KeyError, TypeError) as error:
            last_error = str(error)
        time.sleep(0.5)
    tails = "\n".join(f"--- {s.name} ---\n{s.log_tail()}" for s in services)
    raise LoadTestError(f"servers not ready within {timeout:.0f} s ({last_error})\n{tails}")


def purge_queue(env: Mapping[str, str]) -> str:
    """Drop the messages left in the run's own queue (its name is never used again)."""
    completed = subprocess.run(
        [
            "celery",
            "--app",
            "config",
            "purge",
            "--force",
            "--queues",
            env["CELERY_TASK_DEFAULT_QUEUE"],
        ],
        cwd=PROJECT_DIR,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[-1] if lines else f"celery purge exited {completed.returncode}"


def run_storm(
    settings: RunSettings, env: Mapping[str, str], mode: str, base: str, token: str
) -> int:
    """Run ``bin/loadtest`` in ``mode``; return its exit code."""
    label = LABELS[mode]
    storm_env = {
        **env,
        "LOADTEST_MODE": mode,
        "LOADTEST_LABEL": label,
        "LOADTEST_HOST": base,
        "LOADTEST_TOKEN": token,
        "LOADTEST_REPORT_DIR": str(settings.report_dir),
        "LOADTEST_DURATION": settings.duration,
        "LOADTEST_USERS": str(settings.users),
        "LOADTEST_SIBLING_USERS": str(settings.sibling_users),
    }
    # The storm's interrupt deadline builds on the grace the worker really uses.
    grace = setting(env, "TASKSIGNAL_CANCEL_GRACE")
    if grace and "LOADTEST_CANCEL_GRACE" not in env:
        storm_env["LOADTEST_CANCEL_GRACE"] = grace
    extra = [f"--processes={settings.processes}"] if settings.processes > 1 else []
    until = env.get("LOADTEST_MIN_CANCELS", "0").strip()
    more = f" and until {until} cancels" if until not in ("", "0") else ""
    say(f"{label}: {mode} storm for {settings.duration}{more} against {base}")
    # The load generator shares the machine with the system under test: it must not take the
    # CPU the worker needs to stop tasks, or the latencies measured are its own queueing.
    niceness = int(env.get("LOADTEST_CLIENT_NICE", "10"))
    process = subprocess.Popen(
        [str(PROJECT_DIR / "bin" / "loadtest"), *extra],
        cwd=PROJECT_DIR,
        env=storm_env,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.nice(niceness),
    )
    try:
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted: give locust the chance to write its reports
            process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with suppress(ProcessLookupError):
                process.kill()


def combine(
    settings: RunSettings, codes: dict[str, int], cpu: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Put the runs' summaries side by side in ``summary.json``; return that document.

    Each run gets ``cpu_seconds`` (by part of the system) and ``cpu_ms_per_stop``: the CPU
    the whole system spent per honoured stop, which bounds the rate a machine can sustain.
    """
    runs = {}
    for mode in settings.modes:
        path = settings.report_dir / f"{LABELS[mode]}-summary.json"
        with suppress(OSError, ValueError):
            runs[mode] = json.loads(path.read_text(encoding="utf-8"))
        if mode in runs and mode in cpu:
            runs[mode]["cpu_seconds"] = cpu[mode]
            honoured = runs[mode]["counts"]["honoured"]
            total = sum(cpu[mode].values())
            runs[mode]["cpu_ms_per_stop"] = round(1000 * total / honoured, 1) if honoured else None
    document = {
        "tasksignal": runs.get("cancel"),
        "baseline_revoke": runs.get("revoke"),
        "exit_codes": codes,
        "settings": {
            "duration": settings.duration,
            "storm_users": settings.users,
            "sibling_users": settings.sibling_users,
            "worker_concurrency": settings.worker_concurrency,
            "web_concurrency": settings.web_concurrency,
            "gunicorn_threads": settings.gunicorn_threads,
            "locust_processes": settings.processes,
            "cpus": os.cpu_count(),
        },
    }
    path = settings.report_dir / "summary.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document


def format_table(document: dict[str, Any]) -> str:
    """The two runs side by side, as text."""
    storm, baseline = document.get("tasksignal") or {}, document.get("baseline_revoke") or {}
    rows = [("", "tasksignal cancel", "revoke(terminate) baseline")]

    def both(label: str, key) -> None:
        rows.append((label, key(storm) if storm else "-", key(baseline) if baseline else "-"))

    both("stops honoured / s", lambda s: f"{s['honoured_per_s']}")
    for name in ("started", "honoured", "unhonoured", "cutoff", "siblings_ok", "siblings_failed"):
        both(name.replace("_", " "), lambda s, n=name: str(s["counts"][n]))
    both("tasks in flight (mean)", lambda s: str(s["tasks_in_flight"]["mean"]))
    both("HTTP requests / s", lambda s: str(s["http_per_s"]))

    def cpu(summary: dict) -> str:
        parts = summary.get("cpu_seconds") or {}
        used = " ".join(f"{name} {seconds:.0f}" for name, seconds in parts.items())
        return f"{summary.get('cpu_ms_per_stop')} ms ({used} s)" if parts else "-"

    both("CPU per stop (by part)", cpu)
    steps = sorted({*storm.get("outcomes", {}), *baseline.get("outcomes", {})})
    for step in steps:

        def cell(summary: dict, step: str = step) -> str:
            row = summary.get("outcomes", {}).get(step)
            if row is None:
                return "-"
            return f"n={row['count']} p50 {row['p50_ms']:.0f} / p99 {row['p99_ms']:.0f} ms"

        both(f"{step} latency", cell)

    def seen(summary: dict) -> str:
        row = summary.get("client_stop_seen")
        return "-" if not row else f"p50 {row['p50_ms']:.0f} / p99 {row['p99_ms']:.0f} ms"

    both("stop request to stop seen", seen)
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    notes = []
    if storm:
        notes.append(f"tasksignal latency: {storm['latency_source']}")
        notes += [f"FAIL: {reason}" for reason in storm.get("gate", [])]
    if baseline:
        notes.append(f"baseline latency: {baseline['latency_source']} (not gated)")
    return "\n".join(lines + notes)


def main() -> int:
    """Run the whole load test; return the exit code."""
    try:
        settings = RunSettings.from_env(os.environ)
    except LoadTestError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    log_dir = settings.report_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for stale in settings.report_dir.glob("*-summary.json"):
        stale.unlink()
    env = server_environment(settings, os.environ)
    base = f"http://127.0.0.1:{settings.port}"
    services: list[Service] = []
    codes: dict[str, int] = {}
    cpu: dict[str, dict[str, float]] = {}
    database = database_name(env)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        say("migrating, creating an API token")
        manage(env, "migrate", "--noinput")
        token = os.environ.get("LOADTEST_TOKEN", "").strip() or create_token(env)
        commands = procfile_commands(PROJECT_DIR / "Procfile")
        worker_args = f" --hostname loadtest-{env['LOADTEST_RUN_ID']}@%h"
        worker_args += " --without-mingle --without-gossip"
        services.append(start_service("web", commands["web"], env, log_dir))
        services.append(start_service("worker", commands["worker"] + worker_args, env, log_dir))
        say(
            f"web on {base} ({settings.web_concurrency} x {settings.gunicorn_threads} threads), "
            f"worker with {settings.worker_concurrency} processes; logs in {log_dir}"
        )
        wait_until_ready(base, token, services)
        say("a task went through the API and the worker: ready")
        for index, mode in enumerate(settings.modes):
            if index:
                time.sleep(2.0)  # the previous run's leftover tasks finish being stopped
            before = cpu_snapshot(services, database)
            codes[mode] = run_storm(settings, env, mode, base, token)
            cpu[mode] = cpu_used(before, cpu_snapshot(services, database))
            dead = [s.name for s in services if not s.alive()]
            if dead:
                raise LoadTestError(f"{', '.join(dead)} died during the {mode} run; see {log_dir}")
    except LoadTestError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"loadtest: interrupted ({interrupt}); stopping the servers", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if services:
            say("stopping web and worker")
        for service in reversed(services):
            service.stop()
        if services:
            say(f"stopped; leftover queue: {purge_queue(env)}")
    document = combine(settings, codes, cpu)
    print(f"\n{format_table(document)}\nsummary: {settings.report_dir / 'summary.json'}")
    if "cancel" in codes:
        return codes["cancel"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
