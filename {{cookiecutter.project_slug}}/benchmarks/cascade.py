"""Cascades: cancelling a whole chord on a real worker, and what a large cascade writes.

``chord``
    Each trial starts a chord of ``chord_tasks`` ``cooperative_loop`` tasks (a checkpoint
    every millisecond) with a ``cooperative_loop`` body, on a prefork worker (concurrency
    4), waits until the first header task runs, then cancels the chord through its result
    (``cancel_result``: the body, the header group and every header task, with cascade).
    The running tasks stop at a checkpoint, the queued ones are skipped as the worker
    reaches them. Latency: from the cancel's rows being written (``created``) to the last
    header task's cancel completed (``completed_at``), both on the database clock. The
    trial also checks that the body never ran and that its result is ``REVOKED``.
``wide``
    A cascade over ``wide_tasks`` recorded descendants of one task (lineage rows written
    directly: no worker, only what the cancel costs the caller): the time of
    ``CeleryTaskSignal.objects.cancel(root, cascade=True)`` and the SQL statements it ran
    (``CaptureQueriesContext``; transaction control left out). It must be one statement per
    batch of ``cascade.BATCH_SIZE`` tasks, not one per task.

Targets: every header task stopped and the body never ran in every trial; chord p99 ≤
``CHORD_P99_MS``; the wide cascade runs ``2 + ceil(wide_tasks / BATCH_SIZE)`` statements.

    python -m benchmarks.cascade [--quick] [--chord-tasks N] [--chord-trials N] ...
"""

import math
import sys
import time
import uuid

from benchmarks import common
from benchmarks.common import fmt, target_cell

NAME = "cascade"
DESCRIPTION = "cascade cancel of a chord, and the statements of a large cascade"
DEFAULTS = {"chord_tasks": 100, "chord_trials": 10, "wide_tasks": 1000, "wide_trials": 5}
QUICK = {"chord_tasks": 10, "chord_trials": 1, "wide_tasks": 100, "wide_trials": 1}
SIZES_HELP = {
    "chord_tasks": "tasks in each chord's header",
    "chord_trials": "chords started and cancelled",
    "wide_tasks": "descendants of the wide cascade",
    "wide_trials": "wide cascades timed",
}
#: The chord's cancel must have stopped every task within this, p99.
CHORD_P99_MS = 1000.0
#: Seconds a chord trial waits for every cancel to be completed.
STOP_TIMEOUT = 30.0
WORKER_CONCURRENCY = 4


def chord_trial(client, size: int) -> dict:
    """Start a chord of ``size`` tasks, cancel it once its first task runs; its figures."""
    from celery import chord
    from django.db.models import Max, Min

    from benchmarks import tasks
    from tasksignal.cascade import cancel_result
    from tasksignal.models import CeleryTaskSignal
    from tasksignal.registry import CANCEL_TASK
    from tasksignal.states import Outcome

    header = [tasks.cooperative_loop.si(60.0) for _ in range(size)]
    result = chord(header)(tasks.cooperative_loop.si(0.0))
    header_ids = [member.id for member in result.parent.results]
    common.wait_for_mark(client, header_ids[0], "started", timeout=60.0)
    reach = cancel_result(result)
    cancels = CeleryTaskSignal.objects.filter(task_id__in=header_ids, signal=CANCEL_TASK)
    stopped = cancels.filter(outcome__in=Outcome.STOPPED)
    common.poll(lambda: stopped.count() == size, timeout=STOP_TIMEOUT, interval=0.005)
    span = cancels.aggregate(first=Min("created"), last=Max("completed_at"))
    latency = None
    if span["last"] is not None and stopped.count() == size:
        latency = (span["last"] - span["first"]).total_seconds() * 1000
    outcomes: dict[str, int] = {}
    for outcome in cancels.values_list("outcome", flat=True):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    body_state = result.backend.get_task_meta(result.id, cache=False)["status"]
    return {
        "latency_ms": latency,
        "reached": reach.reached,
        "outcomes": outcomes,
        "body_state": body_state,
        "body_ran": common.read_mark(client, result.id, "started") is not None,
        "task_ids": [*header_ids, result.id, result.parent.id],
    }


def wide_trial(size: int) -> dict:
    """Cascade a cancel over ``size`` recorded descendants; its time and statements."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tasksignal.models import CeleryTaskSignal, TaskLineage

    root = f"bench-root-{uuid.uuid4().hex}"
    ids = [f"{root}-{n}" for n in range(size)]
    TaskLineage.objects.bulk_create(TaskLineage(task_id=i, ancestors=[root]) for i in ids)
    control = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE SAVEPOINT")
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        row = CeleryTaskSignal.objects.cancel(root, cascade=True)
        elapsed_ms = (time.perf_counter() - started) * 1000
    statements = [q for q in queries.captured_queries if not q["sql"].startswith(control)]
    TaskLineage.objects.filter(task_id__in=ids).delete()
    common.delete_records([root, *ids])
    return {"ms": elapsed_ms, "statements": len(statements), "reached": row.reached}


def measure(
    *,
    chord_tasks: int,
    chord_trials: int,
    wide_tasks: int,
    wide_trials: int,
    output_dir=None,
) -> common.Measured:
    """Cancel chords on a worker, then time cascades over recorded tasks."""
    from tasksignal.cascade import BATCH_SIZE
    from tasksignal.models import TaskLineage

    client = common.redis_client()
    chords: list[dict] = []
    with common.benchmark_worker(NAME, output_dir, concurrency=WORKER_CONCURRENCY) as worker:
        for _ in range(chord_trials):
            chords.append(chord_trial(client, chord_tasks))
    log_path = worker.log_path
    used = [task_id for trial in chords for task_id in trial.pop("task_ids")]
    common.delete_records(used)
    TaskLineage.objects.filter(task_id__in=used).delete()
    wides = [wide_trial(wide_tasks) for _ in range(wide_trials)]

    latencies = [t["latency_ms"] for t in chords if t["latency_ms"] is not None]
    clean = sum(t["latency_ms"] is not None and not t["body_ran"] for t in chords)
    expected_statements = 2 + math.ceil(wide_tasks / BATCH_SIZE)
    results = {
        "chord": {
            "latency_ms": common.summarize(latencies, 1),
            "all_stopped_body_never_ran": clean,
            "trials": len(chords),
            "per_trial": chords,
        },
        "wide": {
            "ms": common.summarize([t["ms"] for t in wides], 1),
            "statements": max(t["statements"] for t in wides),
            "statements_per_task": round(max(t["statements"] for t in wides) / wide_tasks, 4),
            "reached": wides[0]["reached"],
        },
    }
    targets = [
        common.target("chord: every task stopped, body never ran", clean / len(chords), ">=", 1.0),
        common.target("chord p99", results["chord"]["latency_ms"]["p99"], "<=", CHORD_P99_MS, "ms"),
        common.target(
            f"wide cascade of {wide_tasks}: statements",
            results["wide"]["statements"],
            "<=",
            expected_statements,
        ),
    ]
    notes = [
        "Chord latency is on the database clock: the cancel rows' created to the last header"
        " task's completed_at (a skip at admission or a stop at a checkpoint).",
        f"The worker runs {WORKER_CONCURRENCY} tasks at a time: most of a chord's header is"
        " still queued when it is cancelled, and is skipped as the worker reaches it.",
        "The wide cascade's time is the caller's (Django ORM, local PostgreSQL), workers aside.",
    ]
    return common.Measured(
        results,
        targets,
        notes,
        common.worker_log_problems(log_path),
        parameters={"batch_size": BATCH_SIZE, "worker_concurrency": WORKER_CONCURRENCY},
    )


def report(payload: dict, path) -> None:
    """Print the short table of a result."""
    results, sizes = payload["results"], payload["parameters"]
    chord_figures, wide_figures = results["chord"]["latency_ms"], results["wide"]["ms"]
    common.print_table(
        "Cascade",
        ["what", "p50", "p99", "n"],
        [
            (
                f"chord of {sizes['chord_tasks']}: cancel → last stopped (ms)",
                chord_figures["p50"],
                chord_figures["p99"],
                chord_figures["n"],
            ),
            (
                f"cascade over {sizes['wide_tasks']}: caller's time (ms)",
                wide_figures["p50"],
                wide_figures["p99"],
                wide_figures["n"],
            ),
        ],
    )
    print(f"  statements for {sizes['wide_tasks']} tasks: {results['wide']['statements']}")
    common.print_targets(payload)
    print(f"  -> {path}")


def markdown(result: dict) -> list[str]:
    """The README's Markdown rows for the cascade benchmark."""
    r, p = result["results"], result["parameters"]
    chord, wide = r["chord"], r["wide"]
    statements = f"wide cascade of {p['wide_tasks']}: statements"
    return [
        "| what | p50 | p99 | checked | target |",
        "|---|---:|---:|---|---|",
        f"| cascade cancel of a {p['chord_tasks']}-task chord: cancel → last task stopped (ms)"
        f" | {fmt(chord['latency_ms']['p50'])} | {fmt(chord['latency_ms']['p99'])}"
        f" | {chord['all_stopped_body_never_ran']}/{chord['trials']} all stopped, body never ran"
        f" | {target_cell(result, 'chord p99')} |",
        f"| cascade over {p['wide_tasks']} recorded tasks: the caller's time (ms)"
        f" | {fmt(wide['ms']['p50'])} | {fmt(wide['ms']['p99'])}"
        f" | {wide['statements']} SQL statements ({wide['statements_per_task']:g} per task)"
        f" | {target_cell(result, statements)} |",
    ]


if __name__ == "__main__":
    common.main(sys.modules[__name__])
