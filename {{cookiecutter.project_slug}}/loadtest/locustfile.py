"""Cancel storm: proves through the JSON API that every cancel ends its task, fast, harming none.

Run it with ``bin/loadtest`` against a running server (compose's ``loadtest`` service does), or
with ``make loadtest``, which also starts gunicorn and a worker, runs this storm, then the same
storm against Celery's ``revoke(terminate=True)`` for comparison (``loadtest/run.py``).

Users
-----
``CancelStormUser``
    Starts a long task (mostly ``cooperative_job``, some ``sleepy_job`` and
    ``wait_for_io_job``, now and then one ``gil_job``), waits a random moment, cancels it
    through ``POST /api/tasks/<id>/cancel/``, then polls ``GET /api/tasks/<id>/`` until the
    task is ``REVOKED`` with a cancel ``outcome``. The cancel is *honoured* when the outcome
    is the ladder step that task's shape needs (or ``skipped``: cancelled before it started)
    and the server-side latency (``latency_ms``: cancel requested to task stopped, both on
    the database clock) is within that step's deadline.
``SiblingUser``
    Starts ``sibling_job(seed, steps)`` and never cancels it: it must succeed with
    ``seed * 2 + steps``. Anything else is *collateral* damage of the storm.

With ``LOADTEST_MODE=revoke`` the storm stops its tasks with ``POST /api/tasks/<id>/revoke/``
instead (the baseline: ``revoke(terminate=True, signal=SIGKILL)``; the web server must run
with ``TASKSIGNAL_API_BASELINE_REVOKE=True``) and measures, client-side, the time from that
request until the task shows ``REVOKED``.

Metrics (Locust request events, so they are aggregated across ``--processes``)
----------------------------------------------------------------------------
========  ===============  ========================================================
type      name             response time (ms)
========  ===============  ========================================================
CANCEL    <outcome>        server-side latency of each honoured cancel
REVOKE    <ladder step>    baseline: revoke request sent to ``REVOKED`` seen
STORM     started          the start request
STORM     cancelled        the cancel (or revoke) request
STORM     honoured         cancel request sent to the stop seen by the client
STORM     unhonoured       a failure naming the task and what went wrong
STORM     cutoff           started but not finished when the run ended
SIBLING   ok / collateral  start to result seen; collateral is a failure
========  ===============  ========================================================

Pass or fail
------------
When the run stops, the master (or the only) process writes ``<label>-summary.json`` to
``LOADTEST_REPORT_DIR`` and, in ``cancel`` mode, sets the exit code to 1 when a cancel was
not honoured, a sibling was harmed, nothing was honoured at all, or the p99 of cooperative
cancels exceeds ``LOADTEST_MAX_P99_MS``. It never sets 0, so HTTP errors still fail the run.
A flow cut off by the end of the run is counted as ``cutoff`` and does not fail it, unless
its cancel was already past its deadline. Tasks the run leaves behind are cancelled.

Settings (environment variables)
--------------------------------
``LOADTEST_TOKEN`` (required)
    API token, sent as ``Authorization: Bearer <token>``.
``LOADTEST_MODE``
    ``cancel`` (default) or ``revoke``.
``LOADTEST_LABEL``
    Name of the report files (default ``storm``, or ``baseline`` in ``revoke`` mode).
``LOADTEST_REPORT_DIR``
    Where the summary goes (default ``loadtest/reports``).
``LOADTEST_MAX_P99_MS``
    Gate on the p99 of cooperative cancels, in ms (default 100).
``LOADTEST_SIBLING_USERS``
    How many of the users are ``SiblingUser`` (default 8); the rest storm.
``LOADTEST_CANCEL_AFTER``
    Range of seconds between starting a task and cancelling it (default ``0.05-1.0``).
``LOADTEST_GIL_EVERY``
    Seconds between two ``gil_job`` starts in one Locust process (default 10; 0: none).
    Each one holds a CPU until it is killed, so keep them rare on small machines.
``LOADTEST_CANCEL_GRACE`` / ``LOADTEST_GIL_KILL_AFTER``
    The server's ``TASKSIGNAL_CANCEL_GRACE`` (default: that variable, else 1.0) and
    ``gil_job``'s ``kill_after`` (3.0): the ladder steps' deadlines are built on them.
``LOADTEST_COOPERATIVE_DEADLINE`` / ``LOADTEST_SLACK`` / ``LOADTEST_POLL_SLACK``
    Deadline of a cooperative stop (3 s); slack added to the interrupt and kill deadlines
    (2 s); extra time the client keeps polling past a deadline before it gives up (5 s).
``LOADTEST_MIN_CANCELS``
    With ``bin/loadtest``: run at least ``LOADTEST_DURATION`` *and* until this many cancels
    were sent, at most ``LOADTEST_MAX_DURATION`` (default 0: just ``LOADTEST_DURATION``).
``LOADTEST_SKIP_DEADLINE``
    Seconds a queued task may take to be skipped (default 10): that is the time a worker
    takes to reach it in the queue, so it bounds the queue rather than tasksignal.
``LOADTEST_SIBLING_DEADLINE``
    Seconds a sibling may take before it counts as collateral (default 30).

This file imports only Locust, gevent and the standard library: importing Locust patches the
standard library for gevent, which Django, Celery and psycopg must not run under.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.runners import STATE_STOPPED, MasterRunner, WorkerRunner
from locust.util.timespan import parse_timespan

logger = logging.getLogger("cancel_storm")

#: Timings and seeds of a load test: nothing here needs to be unpredictable.
RNG = random.Random()  # noqa: S311

TASKS_PATH = "/api/tasks/"
TERMINAL_FAILURES = ("SUCCESS", "FAILURE")
COOPERATIVE, INTERRUPTED, KILLED, SKIPPED = "cooperative", "interrupted", "killed", "skipped"
#: Each ladder step in the order a cancel escalates.
LADDER = (SKIPPED, COOPERATIVE, INTERRUPTED, KILLED)


class CancelNotHonouredError(Exception):
    """A cancel that did not stop its task the way and in the time it had to."""


class CollateralError(Exception):
    """A task nobody cancelled that did not return its result."""


# -- settings --------------------------------------------------------------------------------


def _float(environ: dict[str, str], name: str, default: float) -> float:
    value = environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds or ms, not {value!r}") from None


def _range(environ: dict[str, str], name: str, default: tuple[float, float]) -> tuple[float, float]:
    value = environ.get(name, "").strip()
    if not value:
        return default
    low, sep, high = value.partition("-")
    try:
        bounds = (float(low), float(high if sep else low))
    except ValueError:
        raise ValueError(f"{name} must look like 0.05-1.0, not {value!r}") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name} must be an increasing range of seconds, not {value!r}")
    return bounds


@dataclass(frozen=True)
class StormSettings:
    """What the storm does and what it demands; see the module docstring for the variables."""

    token: str
    mode: str = "cancel"
    label: str = "storm"
    report_dir: Path = Path("loadtest/reports")
    max_p99_ms: float = 100.0
    cancel_after: tuple[float, float] = (0.05, 1.0)
    gil_every: float = 10.0
    cancel_grace: float = 1.0
    gil_kill_after: float = 3.0
    cooperative_deadline: float = 3.0
    slack: float = 2.0
    poll_slack: float = 5.0
    sibling_deadline: float = 30.0
    skip_deadline: float = 10.0
    min_cancels: int = 0
    min_duration: float = 0.0

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> StormSettings:
        """Read the settings from ``environ``; raise ``ValueError`` naming a bad variable."""
        token = environ.get("LOADTEST_TOKEN", "").strip()
        if not token:
            raise ValueError(
                "LOADTEST_TOKEN is not set: create a token with "
                "`python manage.py create_api_token <username>` and export it"
            )
        mode = environ.get("LOADTEST_MODE", "").strip() or "cancel"
        if mode not in ("cancel", "revoke"):
            raise ValueError(f"LOADTEST_MODE must be cancel or revoke, not {mode!r}")
        default_label = "storm" if mode == "cancel" else "baseline"
        grace = _float(environ, "TASKSIGNAL_CANCEL_GRACE", 1.0)
        min_cancels = environ.get("LOADTEST_MIN_CANCELS", "").strip() or "0"
        if not min_cancels.isdigit():
            raise ValueError(f"LOADTEST_MIN_CANCELS must be a whole number, not {min_cancels!r}")
        duration = environ.get("LOADTEST_DURATION", "").strip() or "0"
        try:
            min_duration = float(parse_timespan(duration))
        except ValueError:
            message = f"LOADTEST_DURATION must look like 60s or 1m30s, not {duration!r}"
            raise ValueError(message) from None
        return cls(
            token=token,
            mode=mode,
            label=environ.get("LOADTEST_LABEL", "").strip() or default_label,
            report_dir=Path(environ.get("LOADTEST_REPORT_DIR", "").strip() or "loadtest/reports"),
            max_p99_ms=_float(environ, "LOADTEST_MAX_P99_MS", 100.0),
            cancel_after=_range(environ, "LOADTEST_CANCEL_AFTER", (0.05, 1.0)),
            gil_every=_float(environ, "LOADTEST_GIL_EVERY", 10.0),
            cancel_grace=_float(environ, "LOADTEST_CANCEL_GRACE", grace),
            gil_kill_after=_float(environ, "LOADTEST_GIL_KILL_AFTER", 3.0),
            cooperative_deadline=_float(environ, "LOADTEST_COOPERATIVE_DEADLINE", 3.0),
            slack=_float(environ, "LOADTEST_SLACK", 2.0),
            poll_slack=_float(environ, "LOADTEST_POLL_SLACK", 5.0),
            sibling_deadline=_float(environ, "LOADTEST_SIBLING_DEADLINE", 30.0),
            skip_deadline=_float(environ, "LOADTEST_SKIP_DEADLINE", 10.0),
            min_cancels=int(min_cancels),
            min_duration=min_duration,
        )

    def deadline(self, step: str) -> float:
        """Seconds a cancel may take to stop a task by ladder ``step``.

        A queued task is skipped when a worker takes it from the queue, however long that
        queue is: its deadline bounds the queue, not tasksignal.
        """
        if step == SKIPPED:
            return self.skip_deadline
        if step == INTERRUPTED:
            return self.cancel_grace + self.slack
        if step == KILLED:
            return self.gil_kill_after + self.slack
        return self.cooperative_deadline

    def deadlines_ms(self, shape: Shape) -> dict[str, float]:
        """The deadline of each outcome that honours a cancel of ``shape``, in ms."""
        return {step: self.deadline(step) * 1000 for step in shape.allowed()}

    def give_up(self, shape: Shape) -> float:
        """Seconds after a cancel at which the client stops waiting for ``shape`` to stop."""
        return max(self.deadline(step) for step in shape.allowed()) + self.poll_slack


# -- task shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A task the storm starts, the ladder step a cancel needs to stop it, and how often."""

    task: str
    kwargs: dict[str, Any]
    step: str
    weight: int

    @property
    def name(self) -> str:
        """The task's function name, for reports."""
        return self.task.rsplit(".", 1)[-1]

    def allowed(self) -> tuple[str, ...]:
        """Outcomes that honour a cancel: the shape's step, or skipped (it never started)."""
        return (self.step, SKIPPED)


# Every task would run for 30 s or more if nobody cancelled it, so a cancel always lands while
# it runs (or before it starts), and nothing runs on for long should a run be torn down.
SHAPES = (
    # 20 ms between checkpoints: a cooperative stop costs at most that plus delivery.
    Shape("demo.tasks.cooperative_job", {"steps": 1500, "step_seconds": 0.02}, COOPERATIVE, 80),
    Shape("demo.tasks.sleepy_job", {"seconds": 30.0}, INTERRUPTED, 10),
    Shape("demo.tasks.wait_for_io_job", {"seconds": 30.0}, INTERRUPTED, 10),
)
#: C code holding the GIL: about 10 s to 40 s of one CPU (n=10**9), stopped only by a kill.
GIL_SHAPE = Shape("demo.tasks.gil_job", {"n": 10**9}, KILLED, 0)


# -- per-process state -----------------------------------------------------------------------


@dataclass
class Flow:
    """One started task, from its start request until the client saw how it ended."""

    kind: str  # "storm" or "sibling"
    task_id: str
    shape: Shape | None
    started: float
    cancel_sent: float | None = None
    expected: int | None = None

    def overdue(self, storm: StormSettings, now: float) -> bool:
        """Whether the task should have stopped (storm) or returned (sibling) by ``now``."""
        if self.kind == "sibling":
            return now > self.started + storm.sibling_deadline
        if self.cancel_sent is None or self.shape is None:
            return False
        return now > self.cancel_sent + max(storm.deadline(s) for s in self.shape.allowed())


@dataclass
class ProcessState:
    """What this Locust process tracks: flows in flight, the gil_job schedule, samples."""

    settings: StormSettings | None = None
    in_flight: dict[str, Flow] = field(default_factory=dict)
    next_gil_at: float = 0.0
    samples: list[int] = field(default_factory=lambda: [0, 0, 0])  # sum, count, max
    worker_samples: dict[str, list[int]] = field(default_factory=dict)
    sampler: Any = None
    started_at: float = 0.0
    settled_workers: set[str] = field(default_factory=set)
    stopped_by: str = "run_time"

    def pick_shape(self, storm: StormSettings, now: float) -> Shape:
        """The next task to start: a gil_job when one is due, otherwise by weight."""
        if storm.gil_every > 0 and now >= self.next_gil_at:
            self.next_gil_at = now + storm.gil_every
            return GIL_SHAPE
        return RNG.choices(SHAPES, weights=[shape.weight for shape in SHAPES])[0]

    def storm_in_flight(self) -> int:
        """How many storm tasks this process started and has not yet seen stop."""
        return sum(1 for flow in self.in_flight.values() if flow.kind == "storm")


STATE = ProcessState()


def storm_settings() -> StormSettings:
    """The settings read when Locust started (the ``init`` event)."""
    if STATE.settings is None:
        raise RuntimeError("the cancel storm's settings were not read: is this the locustfile?")
    return STATE.settings


# -- judging -----------------------------------------------------------------------------------


def judge_cancel(
    shape: Shape, body: dict[str, Any], deadlines_ms: dict[str, float]
) -> tuple[bool, str] | None:
    """Judge a cancelled task from its API representation, given each ladder step's deadline.

    Returns ``None`` while it is still on its way to a terminal state, else
    ``(honoured, reason)``.

    >>> shape = Shape("demo.tasks.sleepy_job", {}, INTERRUPTED, 1)
    >>> deadlines = {"interrupted": 3000, "skipped": 10000}
    >>> judge_cancel(shape, {"state": "PENDING", "outcome": None}, deadlines) is None
    True
    >>> body = {"state": "REVOKED", "outcome": "interrupted", "latency_ms": 1012}
    >>> judge_cancel(shape, body, deadlines)
    (True, 'interrupted in 1012 ms')
    >>> body = {"state": "REVOKED", "outcome": "killed", "latency_ms": 3200}
    >>> judge_cancel(shape, body, deadlines)[1]
    'escalated to killed, expected interrupted or skipped'
    >>> judge_cancel(shape, {"state": "SUCCESS", "outcome": "too_late"}, deadlines)[1]
    'ended SUCCESS despite the cancel (outcome too_late)'
    """
    state, outcome = body.get("state"), body.get("outcome")
    if state in TERMINAL_FAILURES:
        return False, f"ended {state} despite the cancel (outcome {outcome})"
    if state != "REVOKED" or not outcome:
        return None
    if outcome not in shape.allowed():
        expected = " or ".join(shape.allowed())
        later = outcome in LADDER and LADDER.index(outcome) > LADDER.index(shape.step)
        return False, f"{'escalated to' if later else 'outcome'} {outcome}, expected {expected}"
    latency = body.get("latency_ms")
    if latency is None:
        return False, f"{outcome} but the API gives no latency_ms"
    deadline_ms = deadlines_ms[outcome]
    if latency > deadline_ms:
        return False, f"{outcome} only after {latency:.0f} ms (deadline {deadline_ms:.0f} ms)"
    return True, f"{outcome} in {latency:.0f} ms"


def judge_sibling(expected: int, body: dict[str, Any]) -> tuple[bool, str] | None:
    """Judge a sibling task: ``None`` while it runs, else ``(ok, reason)``.

    >>> judge_sibling(21, {"state": "STARTED"}) is None
    True
    >>> judge_sibling(21, {"state": "SUCCESS", "result": 21})
    (True, 'returned 21')
    >>> judge_sibling(21, {"state": "FAILURE", "result": "WorkerLostError()"})
    (False, "ended FAILURE: 'WorkerLostError()'")
    """
    state = body.get("state")
    if state == "SUCCESS":
        result = body.get("result")
        if result == expected:
            return True, f"returned {result}"
        return False, f"returned {result!r}, expected {expected}"
    if state in ("FAILURE", "REVOKED"):
        return False, f"ended {state}: {body.get('result')!r}"
    return None


def _poll_delays(first: float, cap: float = 0.25) -> Any:
    """Yield the sleeps between polls: ``first``, then from 10 ms growing by half to ``cap``."""
    yield first
    delay = 0.01
    while True:
        yield delay
        delay = min(delay * 1.5, cap)


def fire(environment: Environment, kind: str, name: str, ms: float, error: Exception | None = None):
    """Record one custom metric sample (Locust's ``request`` event)."""
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=0,
        exception=error,
        context={},
    )


# -- users ---------------------------------------------------------------------------------------


class ApiUser(FastHttpUser):
    """Shared plumbing: authenticated JSON requests against the task API."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 30.0
    connection_timeout = 10.0
    # One request at a time per user: one kept-alive connection, rarely idle long enough
    # for the server to close it (gunicorn's keepalive is 2 s).
    concurrency = 1

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {storm_settings().token}"}

    def start_task(
        self, kind: str, shape: Shape | None, task_name: str, kwargs: dict
    ) -> Flow | None:
        """Start a task through the API; return its flow, or ``None`` if the API refused."""
        began = time.monotonic()
        with self.client.post(
            TASKS_PATH,
            json={"task": task_name, "kwargs": kwargs},
            headers=self._headers(),
            name="POST /api/tasks/",
            catch_response=True,
        ) as response:
            body = _json(response)
            if response.status_code != 202 or not body.get("id"):
                response.failure(f"start {task_name}: {_status(response)} {body}")
                return None
        flow = Flow(kind=kind, task_id=str(body["id"]), shape=shape, started=began)
        STATE.in_flight[flow.task_id] = flow
        return flow

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        """The task's API representation, or ``None`` if the request failed (already recorded)."""
        with self.client.get(
            f"{TASKS_PATH}{task_id}/",
            headers=self._headers(),
            name="GET /api/tasks/[id]/",
            catch_response=True,
        ) as response:
            body = _json(response)
            if response.status_code != 200 or "state" not in body:
                response.failure(f"{_status(response)} {body}")
                return None
        return body

    def finish(self, flow: Flow) -> None:
        """Forget a flow whose end the client has seen."""
        STATE.in_flight.pop(flow.task_id, None)


class CancelStormUser(ApiUser):
    """Starts a long task, cancels it after a random moment, checks that it stopped in time."""

    weight = 1

    @task
    def storm(self) -> None:
        """One flow: start, wait, cancel (or revoke), poll until stopped."""
        storm = storm_settings()
        shape = STATE.pick_shape(storm, time.monotonic())
        flow = self.start_task("storm", shape, shape.task, shape.kwargs)
        if flow is None:
            return
        fire(self.environment, "STORM", "started", (time.monotonic() - flow.started) * 1000)
        gevent.sleep(RNG.uniform(*storm.cancel_after))
        if storm.mode == "revoke":
            self.revoke_and_wait(storm, flow)
        else:
            self.cancel_and_wait(storm, flow)

    def _stop_request(self, flow: Flow, action: str) -> bool:
        sent = time.monotonic()
        for attempt in (1, 2):
            with self.client.post(
                f"{TASKS_PATH}{flow.task_id}/{action}/",
                json={"message": "cancel storm"},
                headers=self._headers(),
                name=f"POST /api/tasks/[id]/{action}/",
                catch_response=True,
            ) as response:
                if response.status_code == 202:
                    response.success()
                    break
                # The API makes cancel and revoke idempotent: a request lost with a kept-alive
                # connection the server had closed is sent again, once, and counted.
                if attempt == 1 and not response.status_code:
                    response.success()
                    fire(self.environment, "STORM", "resent", 0)
                    continue
                hint = ""
                if action == "revoke" and response.status_code == 404:
                    hint = " (is TASKSIGNAL_API_BASELINE_REVOKE=True on the web server?)"
                response.failure(f"{action}: {_status(response)}{hint}")
                self._unhonoured(flow, f"the {action} request failed: {_status(response)}")
                return False
        flow.cancel_sent = sent
        fire(self.environment, "STORM", "cancelled", (time.monotonic() - sent) * 1000)
        return True

    def cancel_and_wait(self, storm: StormSettings, flow: Flow) -> None:
        """Cancel through tasksignal and poll until the task stopped, or its deadline passed."""
        if not self._stop_request(flow, "cancel"):
            return
        deadlines = storm.deadlines_ms(flow.shape)
        give_up = flow.cancel_sent + storm.give_up(flow.shape)
        # Do not poll before the step can have happened: an interrupt waits for the grace.
        # (Capped below gunicorn's 2 s keepalive, so the connection stays open.)
        first = {INTERRUPTED: storm.cancel_grace, KILLED: storm.gil_kill_after}
        for delay in _poll_delays(min(0.9 * first.get(flow.shape.step, 0.0), 1.5)):
            gevent.sleep(delay)
            body = self.get_task(flow.task_id)
            verdict = None if body is None else judge_cancel(flow.shape, body, deadlines)
            if verdict is not None:
                honoured, reason = verdict
                if honoured:
                    self._honoured(flow, body["outcome"], float(body["latency_ms"]))
                else:
                    self._unhonoured(flow, reason)
                return
            if time.monotonic() > give_up:
                seconds = storm.give_up(flow.shape)
                self._unhonoured(
                    flow, f"not stopped {seconds:.0f} s after the cancel ({_seen(body)})"
                )
                return

    def revoke_and_wait(self, storm: StormSettings, flow: Flow) -> None:
        """Baseline: revoke(terminate=True) and poll until the task shows ``REVOKED``."""
        if not self._stop_request(flow, "revoke"):
            return
        give_up = flow.cancel_sent + storm.give_up(flow.shape)
        for delay in _poll_delays(0.0):
            gevent.sleep(delay)
            body = self.get_task(flow.task_id)
            state = None if body is None else body.get("state")
            if state == "REVOKED":
                seen = (time.monotonic() - flow.cancel_sent) * 1000
                # A killed task's run record stays "running"; one that never ran has none.
                started = body.get("run_state") not in (None, "queued")
                fire(self.environment, "REVOKE", flow.shape.step if started else SKIPPED, seen)
                fire(self.environment, "STORM", "honoured", seen)
                self.finish(flow)
                return
            if state in TERMINAL_FAILURES:
                self._unhonoured(flow, f"ended {state} despite the revoke")
                return
            if time.monotonic() > give_up:
                self._unhonoured(flow, f"not REVOKED in time ({_seen(body)})")
                return

    def _honoured(self, flow: Flow, outcome: str, latency_ms: float) -> None:
        fire(self.environment, "CANCEL", outcome, latency_ms)
        fire(self.environment, "STORM", "honoured", (time.monotonic() - flow.cancel_sent) * 1000)
        self.finish(flow)

    def _unhonoured(self, flow: Flow, reason: str) -> None:
        record_unhonoured(self.environment, flow, reason)
        self.finish(flow)


class SiblingUser(ApiUser):
    """Starts short tasks nobody cancels and checks each returns exactly its result."""

    fixed_count = int(os.environ.get("LOADTEST_SIBLING_USERS", "8") or 0)

    @task
    def sibling(self) -> None:
        """One flow: start sibling_job, poll until it ends, check the result."""
        storm = storm_settings()
        seed, steps = RNG.randrange(1_000_000), RNG.randint(5, 15)
        kwargs = {"seed": seed, "steps": steps, "step_seconds": 0.02}
        flow = self.start_task("sibling", None, "demo.tasks.sibling_job", kwargs)
        if flow is None:
            return
        flow.expected = seed * 2 + steps
        for delay in _poll_delays(steps * 0.02, cap=0.5):
            gevent.sleep(delay)
            body = self.get_task(flow.task_id)
            verdict = None if body is None else judge_sibling(flow.expected, body)
            if verdict is not None:
                ok, reason = verdict
                elapsed = (time.monotonic() - flow.started) * 1000
                if ok:
                    fire(self.environment, "SIBLING", "ok", elapsed)
                else:
                    error = CollateralError(f"sibling_job {flow.task_id}: {reason}")
                    fire(self.environment, "SIBLING", "collateral", elapsed, error)
                self.finish(flow)
                return
            if flow.overdue(storm, time.monotonic()):
                waited = storm.sibling_deadline
                error = CollateralError(
                    f"sibling_job {flow.task_id}: no result after {waited:.0f} s"
                )
                fire(self.environment, "SIBLING", "collateral", waited * 1000, error)
                self.finish(flow)
                return


def record_unhonoured(environment: Environment, flow: Flow, reason: str) -> None:
    """Record a cancel that was not honoured, with a message naming the task."""
    name = flow.shape.name if flow.shape else "task"
    error = CancelNotHonouredError(f"{name} {flow.task_id}: {reason}")
    fire(environment, "STORM", "unhonoured", 0, error)


def _seen(body: dict[str, Any] | None) -> str:
    """What the client last saw of a task, for failure messages."""
    if body is None:
        return "the API did not answer"
    return f"state {body.get('state')}, run_state {body.get('run_state')}"


def _status(response: Any) -> str:
    """``HTTP <status>``, or the connection error when there was no HTTP answer."""
    error = getattr(response, "error", None)
    if not response.status_code and error is not None:
        return f"no HTTP answer ({type(error).__name__}: {error})"
    return f"HTTP {response.status_code}"


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


# -- the end of the run ----------------------------------------------------------------------


def _api(environment: Environment, method: str, path: str) -> dict[str, Any] | None:
    """One API request outside any user (not recorded as a sample); ``None`` on failure."""
    base = (environment.host or "").rstrip("/")
    if not base.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        f"{base}{path}",
        data=b"{}" if method == "POST" else None,
        method=method,
        headers={
            "Authorization": f"Bearer {storm_settings().token}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return json.loads(response.read() or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return None


def settle_in_flight(environment: Environment) -> None:
    """Count the flows the end of the run cut off, and stop the tasks they leave behind.

    A storm flow whose cancel is past its deadline gets one last look: it is honoured if the
    task did stop in time, otherwise it fails the run. Other flows count as ``cutoff``.
    """
    storm = storm_settings()
    now = time.monotonic()
    flows = list(STATE.in_flight.values())
    STATE.in_flight.clear()
    action = "revoke" if storm.mode == "revoke" else "cancel"

    def settle(flow: Flow) -> None:
        if flow.kind == "sibling":
            if flow.overdue(storm, now):
                error = CollateralError(f"sibling_job {flow.task_id}: no result by the end")
                fire(environment, "SIBLING", "collateral", 0, error)
            else:
                fire(environment, "SIBLING", "cutoff", 0)
            return
        if flow.overdue(storm, now):
            body = _api(environment, "GET", f"{TASKS_PATH}{flow.task_id}/")
            verdict = None
            if body is not None and storm.mode == "cancel":
                verdict = judge_cancel(flow.shape, body, storm.deadlines_ms(flow.shape))
            if verdict is not None and verdict[0]:
                fire(environment, "CANCEL", body["outcome"], float(body["latency_ms"]))
                fire(environment, "STORM", "honoured", (now - flow.cancel_sent) * 1000)
                return
            reason = verdict[1] if verdict else f"not stopped by the end ({_seen(body)})"
            record_unhonoured(environment, flow, reason)
            return
        fire(environment, "STORM", "cutoff", 0)
        if flow.cancel_sent is None:
            # Leave nothing running: a leftover gil_job would hold a CPU for many seconds.
            _api(environment, "POST", f"{TASKS_PATH}{flow.task_id}/{action}/")

    pool = Pool(20)
    for flow in flows:
        pool.spawn(settle, flow)
    pool.join(timeout=15)
    if flows:
        logger.info("settled %d flows still in flight at the end of the run", len(flows))


def _entry(environment: Environment, kind: str, name: str) -> Any:
    return environment.runner.stats.entries.get((name, kind))


def _count(environment: Environment, kind: str, name: str) -> int:
    entry = _entry(environment, kind, name)
    return entry.num_requests if entry is not None else 0


def _percentiles(entry: Any) -> dict[str, float]:
    return {
        "count": entry.num_requests,
        "p50_ms": entry.get_response_time_percentile(0.50),
        "p95_ms": entry.get_response_time_percentile(0.95),
        "p99_ms": entry.get_response_time_percentile(0.99),
        "max_ms": entry.max_response_time,
    }


def summarise(environment: Environment, elapsed: float) -> dict[str, Any]:
    """Build the run's summary from Locust's (aggregated) statistics."""
    storm = storm_settings()
    stats = environment.runner.stats
    latency_kind = "REVOKE" if storm.mode == "revoke" else "CANCEL"
    outcomes = {
        name: _percentiles(entry)
        for (name, kind), entry in sorted(stats.entries.items())
        if kind == latency_kind
    }
    honoured = _count(environment, "STORM", "honoured")
    client = _entry(environment, "STORM", "honoured")
    failures, examples = Counter(), {}
    for error in stats.errors.values():
        message = f"{error.method} {error.name}: {error.error}"
        kind = re.sub(r"\b[0-9a-f]{8}-[0-9a-f-]{27}\b", "<id>", message)
        kind = re.sub(r"\d+", "N", kind)
        failures[kind] += error.occurrences
        examples.setdefault(kind, message)
    http = [e for (name, kind), e in stats.entries.items() if kind in ("GET", "POST")]
    samples = list(STATE.worker_samples.values()) or [STATE.samples]
    in_flight_mean = sum(s[0] / s[1] for s in samples if s[1])
    summary = {
        "mode": storm.mode,
        "label": storm.label,
        "host": environment.host,
        "elapsed_s": round(elapsed, 1),
        "stopped_by": STATE.stopped_by,
        "min_cancels": storm.min_cancels,
        "users": dict(getattr(environment.runner, "final_user_classes_count", {}) or {}),
        "tasks_in_flight": {
            "mean": round(in_flight_mean, 1),
            "max": sum(s[2] for s in samples),
        },
        "counts": {
            "started": _count(environment, "STORM", "started"),
            "cancelled": _count(environment, "STORM", "cancelled"),
            "honoured": honoured,
            "unhonoured": _count(environment, "STORM", "unhonoured"),
            "cutoff": _count(environment, "STORM", "cutoff"),
            "siblings_ok": _count(environment, "SIBLING", "ok"),
            "siblings_failed": _count(environment, "SIBLING", "collateral"),
            "siblings_cutoff": _count(environment, "SIBLING", "cutoff"),
            "http_requests": sum(e.num_requests for e in http),
            "http_failures": sum(e.num_failures for e in http),
            "http_resent": _count(environment, "STORM", "resent"),
        },
        "honoured_per_s": round(honoured / elapsed, 1) if elapsed > 0 else 0.0,
        "http_per_s": round(sum(e.num_requests for e in http) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_source": (
            "client: revoke request sent to REVOKED seen"
            if storm.mode == "revoke"
            else "server: cancel requested to task stopped (database clock)"
        ),
        "outcomes": outcomes,
        "client_stop_seen": _percentiles(client) if client is not None else None,
        "thresholds": {
            "max_cooperative_p99_ms": storm.max_p99_ms,
            "deadlines_s": {step: storm.deadline(step) for step in LADDER},
            "sibling_deadline_s": storm.sibling_deadline,
        },
        "failures": [
            {"kind": kind, "count": count, "example": examples[kind]}
            for kind, count in failures.most_common(25)
        ],
    }
    summary["gate"] = gate(summary) if storm.mode == "cancel" else []
    summary["passed"] = not summary["gate"] if storm.mode == "cancel" else None
    return summary


def gate(summary: dict[str, Any]) -> list[str]:
    """Reasons the storm fails, each a sentence; empty when it passes.

    >>> gate({"counts": {"honoured": 9, "unhonoured": 0, "siblings_failed": 0},
    ...       "outcomes": {"cooperative": {"p99_ms": 40}},
    ...       "thresholds": {"max_cooperative_p99_ms": 100}})
    []
    >>> gate({"counts": {"honoured": 9, "unhonoured": 2, "siblings_failed": 1},
    ...       "outcomes": {"cooperative": {"p99_ms": 140}},
    ...       "thresholds": {"max_cooperative_p99_ms": 100}})  # doctest: +NORMALIZE_WHITESPACE
    ['2 cancels not honoured', '1 sibling tasks harmed (collateral)',
     'cooperative p99 140 ms > 100 ms']
    """
    counts, reasons = summary["counts"], []
    if counts["unhonoured"]:
        reasons.append(f"{counts['unhonoured']} cancels not honoured")
    if counts["siblings_failed"]:
        reasons.append(f"{counts['siblings_failed']} sibling tasks harmed (collateral)")
    if not counts["honoured"]:
        reasons.append("no cancel was honoured at all")
    cooperative = summary["outcomes"].get(COOPERATIVE)
    limit = summary["thresholds"]["max_cooperative_p99_ms"]
    if cooperative is not None and cooperative["p99_ms"] > limit:
        reasons.append(f"cooperative p99 {cooperative['p99_ms']:.0f} ms > {limit:.0f} ms")
    return reasons


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the log."""
    counts = summary["counts"]
    lines = [
        f"cancel storm ({summary['mode']}): {counts['honoured']} honoured "
        f"({summary['honoured_per_s']}/s), {counts['unhonoured']} not honoured, "
        f"{counts['cutoff']} cut off; siblings {counts['siblings_ok']} ok, "
        f"{counts['siblings_failed']} harmed; {summary['tasks_in_flight']['mean']} tasks in flight",
    ]
    for name, row in summary["outcomes"].items():
        lines.append(
            f"  {name:<12} n={row['count']:<6} p50 {row['p50_ms']:.0f} ms  "
            f"p95 {row['p95_ms']:.0f} ms  p99 {row['p99_ms']:.0f} ms  max {row['max_ms']:.0f} ms"
        )
    lines += [f"  FAIL: {reason}" for reason in summary["gate"]]
    return "\n".join(lines)


# -- event listeners -------------------------------------------------------------------------


#: Master to workers: stop your users now (gracefully) and settle. Worker to master: settled.
STOP_MESSAGE, SETTLED_MESSAGE = "cancel_storm_stop", "cancel_storm_settled"


@events.init.add_listener
def on_init(environment: Environment, runner: Any = None, **_kwargs: Any) -> None:
    """Read the settings once per process; stop with a clear message when one is wrong."""
    try:
        STATE.settings = StormSettings.from_env(dict(os.environ))
    except ValueError as error:
        logger.error("cancel storm: %s", error)
        sys.exit(2)
    if isinstance(runner, MasterRunner):
        runner.register_message(SETTLED_MESSAGE, on_worker_settled)
    elif isinstance(runner, WorkerRunner):
        runner.register_message(STOP_MESSAGE, on_stop_request)


def on_stop_request(environment: Environment, **_kwargs: Any) -> None:
    """Worker: stop the users gracefully (``test_stop`` then settles), or settle again."""
    runner = environment.runner

    def stop() -> None:
        if runner.state == STATE_STOPPED:
            report_settled(runner)
        else:
            runner.stop()

    gevent.spawn(stop)


def report_settled(runner: Any) -> None:
    """Worker: send the master the last samples, then say this worker has settled."""
    # Locust has no public flush; one socket keeps the two messages in this order.
    runner._send_stats()
    runner.send_message(SETTLED_MESSAGE, {"in_flight": list(STATE.samples)})


def on_worker_settled(environment: Environment, msg: Any, **_kwargs: Any) -> None:
    """Master: a worker has settled its flows and sent its last samples."""
    STATE.worker_samples[msg.node_id] = msg.data["in_flight"]
    STATE.settled_workers.add(msg.node_id)


def wait_for_workers(environment: Environment) -> bool:
    """Master: have every worker stop and settle, and wait for it; ``False`` on timeout.

    When ``--run-time`` ends, the master's ``test_stop`` comes before it tells the workers
    to quit, and it waits only half a second for their last statistics: flows still running
    then (``--stop-timeout``) would be lost. So the master asks them to stop first.
    """
    runner = environment.runner
    expected = set(runner.clients.keys()) | set(STATE.worker_samples)
    runner.send_message(STOP_MESSAGE)
    deadline = time.monotonic() + (environment.stop_timeout or 0) + 30
    while time.monotonic() < deadline:
        if expected <= STATE.settled_workers:
            return True
        gevent.sleep(0.2)
    return False


@events.test_start.add_listener
def on_test_start(environment: Environment, **_kwargs: Any) -> None:
    """Reset the per-process state and start sampling how many tasks are in flight."""
    STATE.in_flight.clear()
    STATE.samples[:] = [0, 0, 0]
    STATE.worker_samples.clear()
    STATE.settled_workers.clear()
    STATE.next_gil_at = time.monotonic() + 2.0
    STATE.started_at = time.time()
    STATE.stopped_by = "run_time"
    storm = storm_settings()
    if storm.min_cancels and not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(stop_when_enough, environment)
    if isinstance(environment.runner, MasterRunner):
        return

    def sample() -> None:
        while True:
            gevent.sleep(0.5)
            current = STATE.storm_in_flight()
            STATE.samples[0] += current
            STATE.samples[1] += 1
            STATE.samples[2] = max(STATE.samples[2], current)

    STATE.sampler = gevent.spawn(sample)


def stop_when_enough(environment: Environment) -> None:
    """Master or local: end the run once it lasted ``LOADTEST_DURATION`` *and* cancelled
    ``LOADTEST_MIN_CANCELS`` tasks (``bin/loadtest`` then makes ``--run-time`` the cap).
    """
    storm = storm_settings()
    while True:
        gevent.sleep(0.5)
        elapsed = time.time() - STATE.started_at
        cancelled = _count(environment, "STORM", "cancelled")
        if elapsed >= storm.min_duration and cancelled >= storm.min_cancels:
            logger.info("%d cancels in %.0f s: enough, stopping", cancelled, elapsed)
            STATE.stopped_by = "min_cancels"
            environment.runner.quit()
            return


@events.report_to_master.add_listener
def on_report_to_master(data: dict[str, Any], **_kwargs: Any) -> None:
    """Send this worker's in-flight samples with its statistics."""
    data["cancel_storm_in_flight"] = list(STATE.samples)


@events.worker_report.add_listener
def on_worker_report(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    """Keep each worker's latest in-flight samples (they are cumulative)."""
    if "cancel_storm_in_flight" in data:
        STATE.worker_samples[client_id] = data["cancel_storm_in_flight"]


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    """Settle the flows cut off, then (master or local only) summarise and gate the run."""
    runner = environment.runner
    if not isinstance(runner, MasterRunner):
        if STATE.sampler is not None:
            STATE.sampler.kill(block=False)
            STATE.sampler = None
        settle_in_flight(environment)
    if isinstance(runner, WorkerRunner):
        report_settled(runner)
        return
    complete = not isinstance(runner, MasterRunner) or wait_for_workers(environment)
    storm = storm_settings()
    elapsed = time.time() - STATE.started_at
    summary = summarise(environment, elapsed)
    summary["complete"] = complete
    if not complete and storm.mode == "cancel":
        summary["gate"].append("some Locust workers never reported their last flows")
        summary["passed"] = False
    storm.report_dir.mkdir(parents=True, exist_ok=True)
    path = storm.report_dir / f"{storm.label}-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("%s\nsummary written to %s", format_summary(summary), path)
    if summary["gate"]:
        environment.process_exit_code = 1
