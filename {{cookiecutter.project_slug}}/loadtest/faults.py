"""The cancel storm while its servers fail (``make chaos``): every cancel honoured, nothing lost.

1. Starts a Redis (append-only, as a production Redis keeps its data) and a PostgreSQL
   cluster of the run's own on spare ports, never the shared servers, and removes both
   afterwards (``tasksignal.testing.RedisServer`` and ``PostgresServer``).
2. Starts web and a worker node on them, as ``make loadtest`` does, with a short broker
   visibility timeout (``CHAOS_VISIBILITY_TIMEOUT``, 20 s): a killed node's unacknowledged
   tasks come back within the run instead of hours later.
3. Runs the storm (``bin/loadtest`` with ``LOADTEST_FAULTS=1``: any ladder step honours a
   cancel, the client asks again through outages, every flow is logged) and, each at a
   random moment of its own slice of the run, every fault once:

   ``node-kill``        SIGKILL to the worker's whole process group (main process and pool),
                        then a new node under the same name, as a supervisor would start;
   ``node-freeze``      SIGSTOP to the whole group for ``CHAOS_FREEZE`` (5 s), then SIGCONT;
   ``redis-restart``    Redis down for ``CHAOS_DOWN`` (3 s): broker, results, notices;
   ``postgres-restart`` PostgreSQL down for ``CHAOS_DOWN`` (3 s).

4. Waits until the stack settles (``CHAOS_SETTLE``, 90 s at most), then audits the database:
   no signal left pending, every completed signal with its outcome and time, no run left
   ``running``, ``paused`` or ``queued`` (each one left is listed, with where the broker
   holds its message).
5. Runs the storm again with Celery's ``revoke(terminate=True)`` (the baseline) under the
   same faults at the same moments, and asks the result backend which of the tasks it saw
   ``REVOKED`` ran to their end all the same (``CHAOS_MODES``: ``cancel,revoke``).
6. Writes ``faults-summary.json``: the storm's counts, and per fault kind when it happened,
   how many flows it overlapped, how many of those were honoured, and how long after the
   fault ended their stops were seen (p50, max). Exits 0 only when every cancel was
   honoured, no sibling was harmed or lost, the API answered nothing 5xx but 503, the audit
   found nothing left behind, and the stack recovered without help (a worker that exits on
   its own is restarted, as a supervisor would, and that is reported as a failure).

Settings: ``CHAOS_DURATION`` [90s], ``CHAOS_USERS`` [24], ``CHAOS_SIBLING_USERS`` [6],
``CHAOS_WORKER_CONCURRENCY`` [16], ``CHAOS_SEED`` (the fault moments), ``CHAOS_MODES``
[cancel,revoke], the ones above, and ``LOADTEST_REPORT_DIR``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import environ
import run
import verdict

from tasksignal.states import RunState

FAULTS = ("node-kill", "node-freeze", "redis-restart", "postgres-restart")


def seconds_of(span: str) -> int:
    """Seconds in a Locust-style time span (``90``, ``90s``, ``1m30s``).

    >>> seconds_of("1m30s"), seconds_of("45")
    (90, 45)
    """
    if span.isdigit():
        return int(span)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", span)
    if not span or parts is None:
        raise ValueError(f"not a time span: {span!r}")
    hours, minutes, seconds = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class ChaosSettings:
    """How long, how hard, and how the servers fail; from ``CHAOS_*`` variables."""

    duration: int
    users: int
    sibling_users: int
    worker_concurrency: int
    visibility_timeout: int
    freeze: float
    down: float
    settle: float
    seed: int
    report_dir: Path
    modes: tuple[str, ...] = ("cancel", "revoke")

    @classmethod
    def from_env(cls, env: environ.Env) -> ChaosSettings:
        """Read and check the settings; raise ``run.LoadTestError`` naming a bad one."""
        try:
            settings = cls(
                duration=seconds_of(env.str("CHAOS_DURATION", default="90s")),
                users=env.int("CHAOS_USERS", default=24),
                sibling_users=env.int("CHAOS_SIBLING_USERS", default=6),
                worker_concurrency=env.int("CHAOS_WORKER_CONCURRENCY", default=16),
                visibility_timeout=env.int("CHAOS_VISIBILITY_TIMEOUT", default=20),
                freeze=env.float("CHAOS_FREEZE", default=5.0),
                down=env.float("CHAOS_DOWN", default=3.0),
                settle=env.float("CHAOS_SETTLE", default=90.0),
                seed=env.int("CHAOS_SEED", default=secrets.randbelow(1_000_000)),
                report_dir=Path(env.str("LOADTEST_REPORT_DIR", default="loadtest/reports")),
                modes=tuple(env.list("CHAOS_MODES", default=["cancel", "revoke"])),
            )
        except (ValueError, environ.ImproperlyConfigured) as error:
            raise run.LoadTestError(f"bad CHAOS_* setting: {error}") from None
        if not set(settings.modes) <= {"cancel", "revoke"} or not settings.modes:
            raise run.LoadTestError(f"CHAOS_MODES must name cancel and/or revoke: {settings.modes}")
        if settings.duration < 40:
            raise run.LoadTestError("CHAOS_DURATION must be at least 40s: four faults need room")
        return settings

    def schedule(self) -> list[tuple[str, float]]:
        """Each fault at a random moment of its own quarter of the run (after a 5 s warm-up,
        and leaving the last 10 s to recover), in a random order.

        >>> settings = ChaosSettings(90, 1, 1, 1, 20, 5.0, 3.0, 90.0, 7, Path("."))
        >>> sorted(kind for kind, _ in settings.schedule()) == sorted(FAULTS)
        True
        >>> all(5 <= at <= 80 for _, at in settings.schedule())
        True
        """
        rng = random.Random(self.seed)  # noqa: S311 - fault moments, nothing secret
        kinds = list(FAULTS)
        rng.shuffle(kinds)
        span = (self.duration - 15) / len(kinds)
        return [(kind, 5 + i * span + rng.uniform(0, span / 2)) for i, kind in enumerate(kinds)]


@dataclass
class Fault:
    """One fault as it happened: wall-clock start and end (the outage itself)."""

    kind: str
    start: float
    end: float = 0.0
    note: str = ""


@dataclass
class Stack:
    """The servers of the run and the processes on them, restartable."""

    redis: Any
    postgres: Any
    worker_factory: Callable[[], Any]
    worker: Any = None
    restarts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start_worker(self) -> None:
        """A new worker node (same name, same settings), up and answering pings; tried
        again while a server it needs is down."""
        while True:
            try:
                self.worker = self.worker_factory().start()
                return
            except Exception as error:
                run.say(f"worker did not start ({str(error)[:80]}); again in 2 s")
                time.sleep(2)

    def watch(self, stop: threading.Event) -> None:
        """Restart the worker if it exits by itself (what a supervisor does); note it."""
        while not stop.wait(1.0):
            with self.lock:
                process = self.worker.process
                if process.poll() is not None:
                    self.restarts.append(
                        f"worker exited by itself ({process.returncode}): restarted"
                    )
                    run.say(self.restarts[-1])
                    self.worker.stop()
                    self.start_worker()


def inject(stack: Stack, kind: str, settings: ChaosSettings) -> Fault:
    """Make fault ``kind`` happen now; return it once the failed part is back."""
    fault = Fault(kind, time.time())
    if kind == "node-kill":
        with stack.lock:
            stack.worker.kill()
            stack.worker.stop()
            fault.end = time.time()  # the node is gone; what follows is its recovery
            stack.start_worker()
        fault.note = f"new node ready after {time.time() - fault.end:.1f} s"
    elif kind == "node-freeze":
        with stack.lock:  # a frozen worker must not look dead to the watcher
            os.killpg(stack.worker.process.pid, signal.SIGSTOP)
            time.sleep(settings.freeze)
            os.killpg(stack.worker.process.pid, signal.SIGCONT)
        fault.end = time.time()
    elif kind == "redis-restart":
        stack.redis.restart(down_for=settings.down)
        fault.end = time.time()
    else:
        stack.postgres.restart(down_for=settings.down)
        fault.end = time.time()
    run.say(f"fault {kind}: {fault.end - fault.start:.1f} s {fault.note}".rstrip())
    return fault


def audit(settle: float) -> dict[str, Any]:
    """What the database holds once the stack settled: nothing pending, nothing left live.

    Waits up to ``settle`` seconds for pending signals and live runs to drain.
    """
    from django.db import connections

    from tasksignal.models import CeleryTaskSignal, TaskRun
    from tasksignal.states import RunState

    deadline = time.monotonic() + settle
    while True:
        connections.close_all()  # the run's PostgreSQL restarted under the old connection
        try:
            found = {
                "signals": CeleryTaskSignal.objects.count(),
                "signals_pending": CeleryTaskSignal.objects.filter(completed=False).count(),
                "signals_completed_without_outcome": CeleryTaskSignal.objects.filter(
                    completed=True, outcome=""
                ).count()
                + CeleryTaskSignal.objects.filter(completed=True, completed_at=None).count(),
                "runs": TaskRun.objects.count(),
                "runs_left_live": TaskRun.objects.filter(
                    state__in=[*RunState.LIVE, RunState.QUEUED]
                ).count(),
            }
        except Exception as error:
            found = {"error": str(error)[:200]}
        settled = found.get("signals_pending") == 0 and found.get("runs_left_live") == 0
        if settled or time.monotonic() >= deadline:
            if not settled and "error" not in found:
                found["left_behind"] = left_behind()
            return found
        time.sleep(2)


def left_behind(limit: int = 10) -> list[dict[str, Any]]:
    """The first runs and signals the audit found unfinished, with what the database knows of
    each: enough to tell a lost record from a task that never ran."""
    from tasksignal.models import CeleryTaskSignal, TaskRun
    from tasksignal.states import RunState

    runs = TaskRun.objects.filter(state__in=[*RunState.LIVE, RunState.QUEUED]).order_by("id")
    pending = CeleryTaskSignal.objects.filter(completed=False).values_list("task_id", flat=True)
    task_ids = [*runs.values_list("task_id", flat=True)[:limit], *pending[:limit]]
    found = []
    for task_id in dict.fromkeys(task_ids):
        run_row = TaskRun.objects.filter(task_id=task_id).values(
            "task_name", "state", "worker", "pid", "started_at", "finished_at", "updated_at"
        )
        signals = CeleryTaskSignal.objects.filter(task_id=task_id).values(
            "signal", "completed", "outcome", "created", "acknowledged_at", "completed_at"
        )
        found.append({"task_id": task_id, "run": run_row.first(), "signals": list(signals)})
    try:
        held = broker_copies({entry["task_id"] for entry in found})
    except Exception as error:  # the broker is what failed: say so, keep the rest
        held = {entry["task_id"]: [f"broker not readable: {error}"] for entry in found}
    for entry in found:
        entry["broker"] = held.get(entry["task_id"], "nowhere: lost")
    return json.loads(json.dumps(found, default=str))


def broker_copies(task_ids: set[str]) -> dict[str, str]:
    """Where Redis holds a message of each of ``task_ids``: in its queue, or delivered and
    not acknowledged (a task left live with neither lost its message)."""
    from django.conf import settings

    from config.celery import app
    from tasksignal import broker

    held = broker.held_messages(app, {settings.CELERY_TASK_DEFAULT_QUEUE}) or {}
    return {task_id: held[task_id] for task_id in task_ids if task_id in held}


def per_fault(faults: list[Fault], flows: list[dict]) -> dict[str, dict]:
    """For each fault: the flows it overlapped, how many were honoured, recovery times.

    A flow overlaps a fault when its cancel was sent before the fault ended and its stop
    was seen after the fault began (for siblings: started, seen). Recovery is how long
    after the fault ended the overlapping flows' stops were seen.

    >>> flows = [{"kind": "cancel", "cancelled": 1.0, "seen": 9.0, "honoured": True},
    ...          {"kind": "cancel", "cancelled": 20.0, "seen": 21.0, "honoured": True}]
    >>> per_fault([Fault("redis-restart", 2.0, 5.0)], flows)["redis-restart"]["flows"]
    1
    """
    report = {}
    for fault in faults:
        hit = [
            flow
            for flow in flows
            if flow.get("cancelled", flow.get("started", 0)) <= fault.end
            and flow["seen"] >= fault.start
        ]
        recovery = sorted(max(flow["seen"] - fault.end, 0.0) for flow in hit)
        report[fault.kind] = {
            "at_s": round(fault.start, 3),
            "outage_s": round(fault.end - fault.start, 1),
            "note": fault.note,
            "flows": len(hit),
            "cancels": sum(flow["kind"] != "sibling" for flow in hit),
            "honoured": sum(flow["honoured"] for flow in hit if flow["kind"] != "sibling"),
            "siblings_ok": sum(flow["honoured"] for flow in hit if flow["kind"] == "sibling"),
            "lost": sum(not flow["honoured"] for flow in hit),
            "recovery_p50_s": round(statistics.median(recovery), 2) if recovery else None,
            "recovery_max_s": round(recovery[-1], 2) if recovery else None,
        }
    return report


def failures_of(summary: dict) -> list[str]:
    """Why the fault run failed, one reason a line (none: it passed).

    >>> failures_of({"storm": {"counts": {"unhonoured": 0, "siblings_failed": 0,
    ...     "http_failures": 0, "honoured": 5}}, "audit": {"signals_pending": 0,
    ...     "signals_completed_without_outcome": 0, "runs_left_live": 0}, "restarts": []})
    []
    >>> failures_of({"storm": {"counts": {"unhonoured": 0, "siblings_failed": 0,
    ...     "http_failures": 2, "honoured": 5}, "failures": [{"count": 2, "error": "HTTP 500",
    ...     "name": "GET /api/tasks/[id]/"}]}, "audit": {"signals_pending": 0,
    ...     "signals_completed_without_outcome": 0, "runs_left_live": 0}, "restarts": []})
    ['2 API answers neither 2xx nor 503 (most often 2 x GET /api/tasks/[id]/: HTTP 500)']
    """
    storm, found = summary.get("storm"), summary["audit"]
    if storm is None:
        return ["the storm wrote no summary"]
    counts = storm["counts"]
    # The plain storm's judgement, latency aside: an outage is in it.
    reasons = verdict.gate(counts, {}, math.inf)
    if counts["http_failures"]:
        reason = f"{counts['http_failures']} API answers neither 2xx nor 503"
        if worst := next(iter(storm.get("failures", [])), None):  # the most frequent first
            reason += f" (most often {worst['count']} x {worst['name']}: {worst['error']})"
        reasons.append(reason)
    for key in ("signals_pending", "signals_completed_without_outcome", "runs_left_live"):
        if found.get(key) != 0:
            reasons.append(f"audit: {key} = {found.get(key, found.get('error'))}")
    reasons += summary["restarts"]
    return reasons


def main() -> int:
    """Run the storm under faults, then the baseline under the same faults; return the exit
    code (the baseline never fails the run)."""
    env = environ.Env()
    env.read_env(run.PROJECT_DIR / ".env")
    try:
        settings = ChaosSettings.from_env(env)
    except run.LoadTestError as error:
        print(f"chaos: {error}", file=sys.stderr)
        return 2
    logs = settings.report_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    from tasksignal.testing import PostgresServer, RedisServer

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)  # so the servers are removed

    signal.signal(signal.SIGTERM, on_signal)
    runs: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tasksignal-chaos-") as scratch,
        RedisServer(Path(scratch), persistent=True) as redis_server,
        PostgresServer() as postgres,
    ):
        run.say(f"own servers: Redis :{redis_server.port}, PostgreSQL :{postgres.port}")
        os.environ.pop("LOADTEST_DATABASE_URL", None)  # never the shared server
        os.environ.update(
            {
                "DATABASE_URL": postgres.url,
                "REDIS_URL": redis_server.url,
                "CELERY_BROKER_URL": redis_server.url,
                "CELERY_RESULT_BACKEND": redis_server.url,
                "CELERY_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
                "CELERY_UNACKED_RESTORE_INTERVAL": "2",
                "CELERY_UNACKED_RESTORE_THROTTLE": "1",
            }
        )
        env = environ.Env()
        with run.own_database(env, run_id) as (database_url, _):
            server_env = run.setup_django(database_url, run_id)
            from django.core.management import call_command

            from tasksignal.testing import WebProcess, WorkerProcess

            call_command("migrate", "--noinput", verbosity=0)
            token = run.make_token(run_id)

            def new_worker() -> WorkerProcess:
                return WorkerProcess(
                    concurrency=settings.worker_concurrency,
                    hostname=f"chaos-{run_id}@%h",
                    env=server_env,
                    log_path=logs / "worker.log",
                    ready_timeout=90,
                )

            stack = Stack(redis_server, postgres, new_worker)
            web = WebProcess(
                env={**server_env, "WEB_CONCURRENCY": "2"},
                log_path=logs / "web.log",
                ready_timeout=60,
            )
            with web:
                stack.start_worker()
                run.Target(None, server_env, web.url, token, None, 0).smoke()
                for mode in settings.modes:
                    runs[mode] = storm_under_faults(stack, settings, mode, server_env, web, token)
                stack.worker.stop()
    summary: dict[str, Any] = runs.get("cancel", {"failures": ["the storm did not run"]})
    summary["settings"] = {**asdict(settings), "report_dir": str(settings.report_dir)}
    if "revoke" in runs:
        summary["baseline_revoke"] = runs["revoke"]
    summary["passed"] = not summary["failures"]
    summary_path = settings.report_dir / "faults-summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_report(summary))
    print(f"summary: {summary_path}")
    return 0 if summary["passed"] else 1


def storm_under_faults(
    stack: Stack,
    settings: ChaosSettings,
    mode: str,
    server_env: dict[str, str],
    web: Any,
    token: str,
) -> dict[str, Any]:
    """One storm (``cancel``: tasksignal, ``revoke``: the baseline) with every fault once at
    the moments of ``settings.schedule()``; then the stack settles and the database (or,
    for the baseline, the result backend) is audited."""
    label = "faults" if mode == "cancel" else "faults-baseline"
    flow_log = settings.report_dir / f"{label}-flows.jsonl"
    flow_log.unlink(missing_ok=True)
    run.say(f"{mode} storm for {settings.duration} s, faults (seed {settings.seed}):")
    storm_env = {
        **server_env,
        "LOADTEST_HOST": web.url,
        "LOADTEST_TOKEN": token,
        "LOADTEST_MODE": mode,
        "LOADTEST_LABEL": label,
        "LOADTEST_FAULTS": "1",
        # Latency is the plain storm's business; here an outage is in it.
        "LOADTEST_MAX_P99_MS": "1000000",
        "LOADTEST_FLOW_LOG": str(flow_log),
        "LOADTEST_DURATION": f"{settings.duration}s",
        "LOADTEST_USERS": str(settings.users),
        "LOADTEST_SIBLING_USERS": str(settings.sibling_users),
        "LOADTEST_REPORT_DIR": str(settings.report_dir),
    }
    stack.restarts = []
    storm = threading.Thread(target=run.run_locust, args=(storm_env,), daemon=True)
    stop_watching = threading.Event()
    watcher = threading.Thread(target=stack.watch, args=(stop_watching,), daemon=True)
    began = time.monotonic()
    storm.start()
    watcher.start()
    faults = []
    for kind, at in sorted(settings.schedule(), key=lambda item: item[1]):
        time.sleep(max(0.0, began + at - time.monotonic()))
        faults.append(inject(stack, kind, settings))
    storm.join()
    run.say(f"{mode} storm over; waiting for the stack to settle")
    lines = flow_log.read_text().splitlines() if flow_log.exists() else []
    flows = [json.loads(line) for line in lines]
    found = audit(settings.settle) if mode == "cancel" else audit_revokes(flows, settings)
    stop_watching.set()
    watcher.join()
    storm_path = settings.report_dir / f"{label}-summary.json"
    storm_summary = json.loads(storm_path.read_text()) if storm_path.exists() else None
    summary: dict[str, Any] = {
        "storm": storm_summary,
        "faults": per_fault(faults, flows),
        "audit": found,
        "restarts": stack.restarts,
    }
    summary["failures"] = failures_of(summary) if mode == "cancel" else []
    return summary


def audit_revokes(flows: list[dict], settings: ChaosSettings) -> dict[str, Any]:
    """What became of the baseline's revoked tasks once the broker had time to deliver again
    what a dead node held (the visibility timeout, twice): revoked and seen ``REVOKED``, yet
    finished later all the same (their revoke lived in a worker's memory: celery#8888)."""
    from config.celery import app
    from tasksignal import results

    time.sleep(2 * settings.visibility_timeout)
    revoked = [flow["task_id"] for flow in flows if flow["kind"] == "revoke" and flow["honoured"]]
    try:
        ended = results.ended_states(app.backend, revoked)
    except Exception as error:
        return {"error": str(error)[:200]}
    # SUCCESS: the body ran to its end after all (delivered again, its revoke forgotten);
    # FAILURE: the kill itself, recorded over REVOKED as a lost worker.
    succeeded = sorted(task_id for task_id, state in ended.items() if state == RunState.SUCCEEDED)
    failed = sum(state == RunState.FAILED for state in ended.values())
    return {
        "revoked": len(revoked),
        "succeeded_after_revoked": len(succeeded),
        "failed_after_revoked": failed,
        "examples": succeeded[:5],
    }


def format_report(summary: dict) -> str:
    """The fault run as a table: one line per fault kind, then the verdict."""
    lines = [
        f"{'fault':18} {'outage s':>8} {'flows':>6} {'honoured':>9} {'siblings ok':>12} "
        f"{'lost':>5} {'recovery p50/max s':>19}"
    ]
    for kind, row in summary["faults"].items():
        recovery = f"{row['recovery_p50_s']} / {row['recovery_max_s']}"
        lines.append(
            f"{kind:18} {row['outage_s']:>8} {row['flows']:>6} "
            f"{row['honoured']:>4} of {row['cancels']:<3} {row['siblings_ok']:>12} "
            f"{row['lost']:>5} {recovery:>19}"
        )
    storm = summary["storm"] or {"counts": {}}
    counts = storm["counts"]
    audited = {key: value for key, value in summary["audit"].items() if key != "left_behind"}
    lines.append(
        f"storm: {counts.get('honoured')} of {counts.get('cancelled')} cancels honoured, "
        f"{counts.get('siblings_ok')} siblings ok, {counts.get('siblings_failed')} harmed; "
        f"{counts.get('outage_answers')} answers 503 or none during outages, "
        f"{counts.get('http_failures')} other failures; audit {audited}"
    )
    lines += [f"FAIL: {reason}" for reason in summary["failures"]] or ["PASS"]
    baseline = summary.get("baseline_revoke")
    if baseline is not None:
        counts = (baseline["storm"] or {"counts": {}})["counts"]
        lines.append(
            f"baseline revoke(terminate=True) under the same faults: {counts.get('honoured')} "
            f"of {counts.get('cancelled')} seen REVOKED, {counts.get('siblings_failed')} "
            f"siblings harmed; afterwards {baseline['audit']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
