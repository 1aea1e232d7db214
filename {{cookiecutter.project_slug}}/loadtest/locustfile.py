"""Cancel storm: proves through the JSON API that every cancel ends its task, fast, harming none.

Run it with ``bin/loadtest`` against a running server ({% if cookiecutter.use_docker == "y" %}compose's ``loadtest`` service does){% else %}a staging deployment, say{% endif %}, or with
``make loadtest``, which also starts gunicorn and a worker, runs this storm, then the same
storm against Celery's ``revoke(terminate=True)`` (``loadtest/run.py``).

``CancelStormUser``
    Starts a long task (mostly ``cooperative_job``, some ``sleepy_job`` and
    ``wait_for_io_job``, now and then a ``gil_job``), waits a random moment, and cancels it
    with ``POST /api/tasks/<id>/cancel/?wait=...``: the answer comes when the task stopped,
    with its outcome and latency. Two requests per flow. One flow in ten
    (``--storm-workflows``) starts ``demo.tasks.workflow`` instead, a chord of three jobs
    and a callback, cancels it whole with ``?cascade=true`` and reads every job and the
    callback: each job must stop like any cancelled task, the callback never run. In
    ``revoke`` mode (the baseline) it revokes the task instead and polls
    ``GET /api/tasks/<id>/`` until ``REVOKED``, the way a Celery user has to.
``SiblingUser``
    Starts ``sibling_job(seed, steps)`` and reads it with ``GET /api/tasks/<id>/?wait=...``;
    it must return ``seed * 2 + steps``. Anything else is collateral damage of the storm.

Judging lives in ``verdict.py``. Options: ``bin/loadtest --help`` (each also from its
``LOADTEST_*`` variable or ``locust.conf``). When the run ends this writes
``<label>-summary.json`` to the report folder and, in ``cancel`` mode, exits 1 when a cancel
was not honoured, a sibling was harmed, or the cooperative p99 is over the limit.

This file imports only Locust, gevent and the standard library: importing Locust patches the
standard library for gevent, which Django, Celery and psycopg must not run under.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import summary
import verdict
from gevent.pool import Pool
from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.util.timespan import parse_timespan

from tasksignal.states import Outcome, RunState

logger = logging.getLogger("cancel_storm")
RNG = random.Random()  # noqa: S311 - timings and seeds of a load test, nothing secret
TASKS = "/api/tasks/"
#: What the API answers while PostgreSQL or Redis is down (0: no HTTP answer at all).
OUTAGE_ANSWERS = (0, 503)


@dataclass(frozen=True)
class Shape:
    """A task the storm starts, the rung a cancel needs to stop it, and how often."""

    task: str
    kwargs: dict[str, Any]
    step: str
    weight: int = 0


# Every task would run 30 s or more if nobody cancelled it, so a cancel always lands while
# it runs (or before it starts).
SHAPES = (
    Shape(
        "demo.tasks.cooperative_job", {"steps": 1500, "step_seconds": 0.02}, Outcome.COOPERATIVE, 80
    ),
    Shape("demo.tasks.sleepy_job", {"seconds": 30.0}, Outcome.INTERRUPTED, 10),
    Shape("demo.tasks.wait_for_io_job", {"seconds": 30.0}, Outcome.INTERRUPTED, 10),
)
#: C code holding the GIL (10 s to 40 s of a CPU): stopped only by the isolated kill.
GIL_SHAPE = Shape("demo.tasks.gil_job", {"n": 10**9}, Outcome.KILLED)
#: A chord of three 30 s cooperative jobs and a callback, cancelled whole (``?cascade=true``).
WORKFLOW = Shape(
    "demo.tasks.workflow", {"jobs": 3, "steps": 1500, "step_seconds": 0.02}, Outcome.COOPERATIVE
)


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    """The storm's options; each also reads its ``LOADTEST_*`` environment variable."""

    def option(name: str, variable: str, **kwargs) -> None:
        parser.add_argument(f"--storm-{name}", env_var=f"LOADTEST_{variable}", **kwargs)

    option("token", "TOKEN", default="", is_secret=True, help="API token (Bearer)")
    option("mode", "MODE", default="cancel", choices=("cancel", "revoke"), help="or the baseline")
    option("label", "LABEL", default="", help="report name (storm, or baseline for revoke)")
    option("report-dir", "REPORT_DIR", default="loadtest/reports", help="where reports go")
    option("siblings", "SIBLING_USERS", type=int, default=8, help="users that never cancel")
    option("max-p99-ms", "MAX_P99_MS", type=float, default=100.0, help="cooperative p99 gate")
    option("cancel-after", "CANCEL_AFTER", default="0.05-1.0", help="seconds, start to cancel")
    option("gil-every", "GIL_EVERY", type=float, default=10.0, help="seconds between gil_jobs")
    option("workflows", "WORKFLOW_SHARE", type=float, default=0.1, help="share cancelled whole")
    option("cancel-grace", "CANCEL_GRACE", type=float, default=1.0, help="the server's grace")
    option("kill-after", "GIL_KILL_AFTER", type=float, default=3.0, help="gil_job's kill_after")
    option("slack", "SLACK", type=float, default=2.0, help="added to interrupt/kill deadlines")
    option("skip-deadline", "SKIP_DEADLINE", type=float, default=10.0, help="for queued tasks")
    option("sibling-deadline", "SIBLING_DEADLINE", type=float, default=30.0, help="seconds")
    option("min-cancels", "MIN_CANCELS", type=int, default=0, help="run on until this many")
    option("min-duration", "DURATION", default="0s", help="...and at least this long (60s)")
    option("faults", "FAULTS", type=int, default=0, help="1: servers fail during the run")
    option("fault-deadline", "FAULT_DEADLINE", type=float, default=90.0, help="with faults")
    option("flow-log", "FLOW_LOG", default="", help="write each flow as a JSON line here")


class Storm:
    """What the storm tracks in this process: its settings, flows in flight, samples."""

    def __init__(self) -> None:
        self.options: Any = None
        self.deadlines = verdict.Deadlines()
        self.cancel_after = (0.05, 1.0)
        self.in_flight: dict[str, Shape | None] = {}
        self.samples: list[int] = []
        self.next_gil = 0.0
        self.started = 0.0
        self.flow_log = None

    def configure(self, options) -> None:
        """Read the parsed options (Locust's ``init`` event)."""
        self.options = options
        low, _, high = options.storm_cancel_after.partition("-")
        self.cancel_after = (float(low), float(high or low))
        if options.storm_faults:
            self.deadlines = verdict.Deadlines.during_faults(options.storm_fault_deadline)
        else:
            self.deadlines = verdict.Deadlines(
                cancel_grace=options.storm_cancel_grace,
                kill_after=options.storm_kill_after,
                slack=options.storm_slack,
                skip=options.storm_skip_deadline,
            )
        self.flow_log = open(options.storm_flow_log, "a") if options.storm_flow_log else None  # noqa: SIM115

    def log_flow(self, **flow) -> None:
        """One line of the flow log (wall-clock times, so faults can be laid over them)."""
        if self.flow_log is not None:
            self.flow_log.write(json.dumps(flow) + "\n")
            self.flow_log.flush()

    def pick(self) -> Shape:
        """The next task to start: a gil_job when one is due, otherwise one by weight."""
        now = time.monotonic()
        if self.options.storm_gil_every > 0 and now >= self.next_gil:
            self.next_gil = now + self.options.storm_gil_every
            return GIL_SHAPE
        return RNG.choices(SHAPES, weights=[shape.weight for shape in SHAPES])[0]


STORM = Storm()


def fire(environment: Environment, kind: str, name: str, ms: float, error=None) -> None:
    """Record one sample of the storm's own metrics (Locust's ``request`` event)."""
    environment.events.request.fire(
        request_type=kind, name=name, response_time=ms, response_length=0, exception=error
    )


class Unhonoured(Exception):
    """A cancel that did not stop its task the way and in the time it had to."""


class Collateral(Exception):
    """A task nobody cancelled that did not return its result."""


class ApiUser(FastHttpUser):
    """Authenticated JSON requests against the task API, one at a time per user."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 60.0
    concurrency = 1

    def call(self, method: str, path: str, name: str, body: dict | None = None) -> tuple:
        """One request; returns ``(status, json body)`` (status 0: no HTTP answer)."""
        headers = {"Authorization": f"Bearer {STORM.options.storm_token}"}
        with self.client.request(
            method, path, json=body, headers=headers, name=name, catch_response=True
        ) as response:
            try:
                data = response.json() if response.text else {}
            except ValueError:
                data = {}
            if response.status_code in (200, 202):
                response.success()
            elif STORM.options.storm_faults and response.status_code in OUTAGE_ANSWERS:
                # Expected while a server is down: counted apart, not a failure.
                response.success()
                fire(self.environment, "OUTAGE", str(response.status_code), 0)
            else:
                response.failure(f"HTTP {response.status_code}: {str(data)[:200]}")
            return response.status_code, data if isinstance(data, dict) else {}

    def call_through_outages(self, method: str, path: str, name: str, give_up: float) -> tuple:
        """``call``, again every half second while the answer says a server is down (503, or
        no answer) and ``give_up`` (monotonic) has not passed. Only for idempotent requests."""
        while True:
            status, data = self.call(method, path, name)
            if status not in OUTAGE_ANSWERS or time.monotonic() >= give_up:
                return status, data
            gevent.sleep(0.5)

    def read_until_finished(self, task_id: str, give_up: float) -> dict:
        """The task's document once it finished (a stopped task: with its cancel's outcome),
        or as it is when ``give_up`` passes."""
        answer: dict = {}
        while time.monotonic() < give_up and not answer.get("finished"):
            left = max(give_up - time.monotonic(), 0.1)
            path = f"{TASKS}{task_id}/?wait={left:.1f}"
            status, answer = self.call_through_outages("GET", path, "GET /api/tasks/[id]/", give_up)
            if status != 200:  # an error comes back at once: ask again in a moment
                gevent.sleep(0.5)
        return answer

    def start_task(self, shape: Shape | None, task_name: str, kwargs: dict) -> str | None:
        """Start a task; return its id, or ``None`` if the API refused it."""
        body = {"task": task_name, "kwargs": kwargs}
        status, data = self.call("POST", TASKS, "POST /api/tasks/", body)
        # A 503 refused the task (its record was removed), so trying again starts it once.
        while STORM.options.storm_faults and status == 503:
            gevent.sleep(0.5)
            status, data = self.call("POST", TASKS, "POST /api/tasks/", body)
        if status != 202 or not data.get("id"):
            return None
        STORM.in_flight[data["id"]] = shape
        return data["id"]


class CancelStormUser(ApiUser):
    """Starts a long task, cancels it after a random moment, checks that it stopped in time."""

    @task
    def storm(self) -> None:
        """One flow: start, wait, cancel and see the stop (or revoke and poll)."""
        cancel_mode = STORM.options.storm_mode == "cancel"  # Celery cannot stop a workflow
        if cancel_mode and RNG.random() < STORM.options.storm_workflows:
            self.cancel_workflow()
            return
        shape = STORM.pick()
        task_id = self.start_task(shape, shape.task, shape.kwargs)
        if task_id is None:
            return
        fire(self.environment, "STORM", "started", 0)
        gevent.sleep(RNG.uniform(*STORM.cancel_after))
        sent = time.monotonic()
        if STORM.options.storm_mode == "revoke":
            self.revoke_and_poll(task_id, shape, sent)
        else:
            self.cancel_and_wait(task_id, shape, sent)
        STORM.in_flight.pop(task_id, None)

    def cancel_and_wait(self, task_id: str, shape: Shape, sent: float) -> None:
        """Cancel and wait for the stop in the same request: two requests per flow (more
        only when a server is down and the answer has to be asked for again)."""
        wait = STORM.deadlines.longest(shape.step)
        give_up = sent + wait
        fire(self.environment, "STORM", "cancelled", 0)
        status, answer = self.call_through_outages(
            "POST",
            f"{TASKS}{task_id}/cancel/?wait={wait:g}",
            "POST /api/tasks/[id]/cancel/",
            give_up,
        )
        while STORM.options.storm_faults and status in (200, 202, *OUTAGE_ANSWERS):
            if answer.get("completed") or answer.get("finished") or time.monotonic() >= give_up:
                break
            left = max(give_up - time.monotonic(), 0.1)
            status, answer = self.call_through_outages(
                "GET", f"{TASKS}{task_id}/?wait={left:.1f}", "GET /api/tasks/[id]/", give_up
            )
        seen = time.time()
        if status not in (200, 202):
            honoured, reason = False, f"the cancel failed, HTTP {status}"
        else:
            honoured, reason = verdict.judge_cancel(
                shape.step, answer, STORM.deadlines, any_step=bool(STORM.options.storm_faults)
            )
        STORM.log_flow(
            kind="cancel", task_id=task_id, task=shape.task, cancelled=time.time() - (
                time.monotonic() - sent
            ), seen=seen, honoured=honoured, outcome=answer.get("outcome"), reason=reason,
        )  # fmt: skip
        if honoured:
            fire(self.environment, "CANCEL", answer["outcome"], float(answer["latency_ms"]))
            fire(self.environment, "STORM", "honoured", (time.monotonic() - sent) * 1000)
        else:
            error = Unhonoured(f"{shape.task} {task_id}: {reason}")
            fire(self.environment, "STORM", "unhonoured", 0, error)

    def cancel_workflow(self) -> None:
        """One flow over a whole workflow: start a chord of cooperative jobs, cancel the
        task that started it with ``?cascade=true`` after a random moment, and read each job
        and the callback until they ended: every job stopped, the callback never ran."""
        root = self.start_task(WORKFLOW, WORKFLOW.task, WORKFLOW.kwargs)
        if root is None:
            return
        fire(self.environment, "STORM", "started", 0)
        give_up = time.monotonic() + STORM.deadlines.longest(WORKFLOW.step) + 30
        # The root returns once it has sent the chord: its result names the jobs and callback.
        started = self.read_until_finished(root, give_up)
        ids = started.get("result") if started.get("state") == "SUCCESS" else None
        gevent.sleep(RNG.uniform(*STORM.cancel_after))
        sent, cancelled_at = time.monotonic(), time.time()
        fire(self.environment, "STORM", "cancelled", 0)
        path = f"{TASKS}{root}/cancel/?cascade=true"
        status, _ = self.call_through_outages("POST", path, "POST cancel ?cascade", give_up)
        if not isinstance(ids, dict):
            honoured, reason = False, f"the workflow did not start its chord: {started}"
        elif status not in (200, 202):
            honoured, reason = False, f"the cascade cancel failed, HTTP {status}"
        else:
            give_up = sent + STORM.deadlines.longest(WORKFLOW.step)
            jobs = [self.read_until_finished(job, give_up) for job in ids["jobs"]]
            callback = self.read_until_finished(ids["callback"], give_up)
            honoured, reason = verdict.judge_workflow(
                jobs, callback, STORM.deadlines, any_step=bool(STORM.options.storm_faults)
            )
        STORM.in_flight.pop(root, None)
        STORM.log_flow(
            kind="workflow", task_id=root, task=WORKFLOW.task, cancelled=cancelled_at,
            seen=time.time(), honoured=honoured, outcome=None, reason=reason,
        )  # fmt: skip
        elapsed = (time.monotonic() - sent) * 1000
        if honoured:
            fire(self.environment, "STORM", "honoured", elapsed)
            fire(self.environment, "WORKFLOW", "honoured", elapsed)
        else:
            error = Unhonoured(f"workflow {root}: {reason}")
            fire(self.environment, "STORM", "unhonoured", 0, error)
            fire(self.environment, "WORKFLOW", "unhonoured", 0)

    def revoke_and_poll(self, task_id: str, shape: Shape, sent: float) -> None:
        """Baseline: Celery's revoke(terminate=True), then poll until ``REVOKED`` is seen."""
        fire(self.environment, "STORM", "cancelled", 0)
        give_up = sent + STORM.deadlines.longest(shape.step)
        status, _ = self.call_through_outages(  # a revoke, like a cancel, may be sent again
            "POST",
            f"/loadtest/tasks/{task_id}/revoke/",
            "POST /loadtest/tasks/[id]/revoke/",
            give_up,
        )
        delay, state = 0.01, None
        while status == 202 and time.monotonic() < give_up:
            gevent.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            _, document = self.call("GET", f"{TASKS}{task_id}/", "GET /api/tasks/[id]/")
            state = document.get("state", state)
            if state == "REVOKED":
                seen = (time.monotonic() - sent) * 1000
                started = document.get("run_state") not in (None, RunState.QUEUED)
                fire(self.environment, "REVOKE", shape.step if started else Outcome.SKIPPED, seen)
                fire(self.environment, "STORM", "honoured", seen)
                break
            if state in verdict.FAILED_STATES:
                break
        STORM.log_flow(
            kind="revoke", task_id=task_id, task=shape.task, cancelled=time.time() - (
                time.monotonic() - sent
            ), seen=time.time(), honoured=state == "REVOKED", outcome=state,
            reason=f"state {state}",
        )  # fmt: skip
        if state != "REVOKED":
            error = Unhonoured(f"{shape.task} {task_id}: not REVOKED in time after the revoke")
            fire(self.environment, "STORM", "unhonoured", 0, error)


class SiblingUser(ApiUser):
    """Starts short tasks nobody cancels and checks each returns exactly its result."""

    fixed_count = 8  # set from --storm-siblings when Locust starts

    @task
    def sibling(self) -> None:
        """One flow: start ``sibling_job``, read it once it ended, check the result."""
        seed, steps = RNG.randrange(1_000_000), RNG.randint(5, 15)
        kwargs = {"seed": seed, "steps": steps, "step_seconds": 0.02}
        started = time.monotonic()
        task_id = self.start_task(None, "demo.tasks.sibling_job", kwargs)
        if task_id is None:
            return
        options = STORM.options
        wait = (
            options.storm_fault_deadline if options.storm_faults else options.storm_sibling_deadline
        )
        # A sibling on a node that was killed comes back when the broker delivers it again.
        answer = self.read_until_finished(task_id, started + wait)
        STORM.in_flight.pop(task_id, None)
        ok, reason = verdict.judge_sibling(seed * 2 + steps, answer)
        elapsed = (time.monotonic() - started) * 1000
        STORM.log_flow(
            kind="sibling", task_id=task_id, started=time.time() - elapsed / 1000,
            seen=time.time(), honoured=ok, reason=reason,
        )  # fmt: skip
        if ok:
            fire(self.environment, "SIBLING", "ok", elapsed)
        else:
            error = Collateral(f"{task_id}: {reason}")
            fire(self.environment, "SIBLING", "collateral", elapsed, error)


# -- the run's beginning and end ----------------------------------------------------------------
@events.init.add_listener
def on_init(environment: Environment, **_kwargs) -> None:
    """Read the options once; refuse to start without a token."""
    options = environment.parsed_options
    if options is None:
        return
    if not options.storm_token:
        logger.error(
            "cancel storm: no token: set LOADTEST_TOKEN (python manage.py create_api_token <user>)"
        )
        raise SystemExit(2)
    STORM.configure(options)
    SiblingUser.fixed_count = options.storm_siblings


@events.test_start.add_listener
def on_test_start(environment: Environment, **_kwargs) -> None:
    """Sample how many tasks are in flight; end the run once it had enough cancels."""
    STORM.started = time.time()
    STORM.next_gil = time.monotonic() + 2.0

    def sample() -> None:
        while True:
            gevent.sleep(0.5)
            STORM.samples.append(sum(1 for shape in STORM.in_flight.values() if shape))

    def stop_when_enough() -> None:
        options = STORM.options
        while True:
            gevent.sleep(0.5)
            cancelled = summary.count(environment, "STORM", "cancelled")
            elapsed = time.time() - STORM.started
            long_enough = elapsed >= parse_timespan(options.storm_min_duration)
            if long_enough and cancelled >= options.storm_min_cancels:
                logger.info("%d cancels in %.0f s: enough, stopping", cancelled, elapsed)
                environment.runner.quit()
                return

    gevent.spawn(sample)
    if STORM.options.storm_min_cancels:
        gevent.spawn(stop_when_enough)


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_kwargs) -> None:
    """Count the flows the end cut off and stop their tasks; summarise; gate the exit code."""
    cutoff = dict(STORM.in_flight)
    STORM.in_flight.clear()
    pool = Pool(20)
    for task_id, shape in cutoff.items():
        fire(environment, "STORM" if shape else "SIBLING", "cutoff", 0)
        if shape is not None:  # leave nothing running: a leftover gil_job holds a CPU
            pool.spawn(_stop_task, environment, task_id)
    pool.join(timeout=15)
    result = summary.summarise(environment, STORM, time.time() - STORM.started)
    folder = Path(STORM.options.storm_report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result['label']}-summary.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("cancel storm: %s; summary in %s", result["counts"], path)
    if result["gate"]:
        for reason in result["gate"]:
            logger.error("FAIL: %s", reason)
        environment.process_exit_code = 1


def _stop_task(environment: Environment, task_id: str) -> None:
    if STORM.options.storm_mode == "revoke":
        path = f"/loadtest/tasks/{task_id}/revoke/"
    else:  # with cascade: a workflow's root stops everything it started
        path = f"{TASKS}{task_id}/cancel/?cascade=true"
    request = urllib.request.Request(  # noqa: S310 - the host under test
        f"{environment.host.rstrip('/')}{path}",
        data=b"",
        method="POST",
        headers={"Authorization": f"Bearer {STORM.options.storm_token}"},
    )
    try:
        urllib.request.urlopen(request, timeout=5).close()  # noqa: S310
    except OSError:
        logger.warning("could not stop %s at the end of the run", task_id)
