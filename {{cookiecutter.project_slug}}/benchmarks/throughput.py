"""No-op task throughput: ``SignalAwareTask`` (run records on) against a plain Celery task.

One prefork worker (concurrency 2) runs both kinds. Each round sends ``tasks`` no-op tasks
of one kind with ``apply_async`` and waits for every result, then does the same with the
other kind; the kind that goes first alternates from round to round. Throughput is tasks
per second from the first send to the last result; the ratio is signal-aware over plain,
per round (paired rounds) and of the medians.

Three figures say where a difference comes from:

* ``worker_runtime_us``: Celery's own "succeeded in" runtime of each task, from the worker
  log. It covers the task's call (so ``SignalAwareTask``'s begin and end) and storing the
  result, not the broker: the task base's cost per task.
* ``cpu_ms_per_1000_tasks``: CPU time used per 1000 tasks by the worker's children, its
  main process and the PostgreSQL backends of this database (when PostgreSQL runs on this
  machine), read from the operating system around each batch. Less sensitive to other
  load than throughput, and it shows what the run records cost the database.
  ``cpu_ratio`` (plain over signal-aware) is where the throughput ratio tends when the
  CPUs are the bottleneck.
* ``records_off``: a second worker with ``TASKSIGNAL_RECORD_RUNS=False`` measured the
  same way (skip it with ``--no-records-off``): what is left without the run records.

The run records of the main measurement are the project's default (``TASKSIGNAL_RECORD_RUNS``);
the benchmark counts the ``TaskRun`` rows written to prove it, then deletes them.

Target: signal-aware throughput at least 0.95 of the plain task's (main measurement).

    python -m benchmarks.throughput [--quick] [--rounds N] [--tasks N] [--no-records-off]
"""

import re
import sys
import time

import psutil

from benchmarks import common
from benchmarks.common import fmt, target_cell

NAME = "throughput"
DESCRIPTION = "no-op SignalAwareTask vs plain Celery task throughput, prefork concurrency 2"
DEFAULTS = {"rounds": 6, "tasks": 500, "warmup": 100, "records_off": True}
QUICK = {"rounds": 2, "tasks": 20, "warmup": 4, "records_off": True}
SIZES_HELP = {
    "rounds": "rounds, each running both kinds in turn",
    "tasks": "tasks of each kind per round",
    "warmup": "tasks of each kind before measuring",
    "records_off": "the second measurement, on a worker that records no runs",
}
MIN_RATIO = 0.95
KINDS = ("signal_aware", "plain")
SUCCEEDED = re.compile(r"\[(?P<id>[0-9a-f-]{36})\] succeeded in (?P<seconds>[0-9.e-]+)s")


def _send_and_wait(task, count: int) -> tuple[float, list[str]]:
    """Send ``count`` runs of ``task``, wait for all results; return (seconds, task ids)."""
    from celery.result import ResultSet

    start = time.perf_counter()
    results = ResultSet([task.apply_async() for _ in range(count)])
    results.get(timeout=max(60.0, count * 0.1))
    elapsed = time.perf_counter() - start
    ids = [result.id for result in results.results]
    results.forget()
    return elapsed, ids


def _postgres_backends() -> list[int]:
    """Pids of the other PostgreSQL backends of this database, if they run on this machine."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        pids = [row[0] for row in cursor.fetchall()]
    local = []
    for pid in pids:
        try:
            if "postgres" in psutil.Process(pid).name():
                local.append(pid)
        except psutil.Error:
            continue
    return local


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU seconds of each process still alive."""
    seconds = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        seconds[pid] = times.user + times.system
    return seconds


def _cpu_snapshot(worker) -> dict[str, dict[int, float]]:
    return {
        "worker_children": _cpu_seconds(worker.child_pids()),
        "worker_main": _cpu_seconds([worker.process.pid]),
        "postgres": _cpu_seconds(_postgres_backends()),
    }


def _cpu_used(before: dict, after: dict) -> dict[str, float | None]:
    """CPU seconds used between two snapshots, per group (new processes count whole)."""
    used: dict[str, float | None] = {}
    for group, now in after.items():
        if not now and not before[group]:
            used[group] = None  # nothing visible (say, PostgreSQL in a container)
            continue
        used[group] = sum(seconds - before[group].get(pid, 0.0) for pid, seconds in now.items())
    return used


def measure_phase(worker, task_of: dict, *, rounds: int, tasks: int, warmup: int) -> dict:
    """Alternating rounds of each kind on ``worker``; return rates, ids and CPU per round."""
    figures = {
        "rates": {kind: [] for kind in KINDS},
        "ids": {kind: [] for kind in KINDS},
        "cpu_ms_per_1000": {kind: [] for kind in KINDS},
        "warmup_ids": [],
        "paired_ratios": [],
    }
    for kind in KINDS:  # first runs start each child's runtime and connections
        figures["warmup_ids"] += _send_and_wait(task_of[kind], warmup)[1]
    for number in range(rounds):
        for kind in KINDS if number % 2 == 0 else KINDS[::-1]:
            before = _cpu_snapshot(worker)
            elapsed, sent = _send_and_wait(task_of[kind], tasks)
            used = _cpu_used(before, _cpu_snapshot(worker))
            figures["rates"][kind].append(tasks / elapsed)
            figures["ids"][kind] += sent
            figures["cpu_ms_per_1000"][kind].append(
                {g: None if s is None else s * 1e6 / tasks for g, s in used.items()}
            )
        figures["paired_ratios"].append(
            figures["rates"]["signal_aware"][-1] / figures["rates"]["plain"][-1]
        )
    return figures


def _cpu_summary(per_round: list[dict]) -> dict:
    """Median CPU ms per 1000 tasks of each group over the rounds, and their total."""
    groups = per_round[0].keys() if per_round else ()
    summary = {}
    for group in groups:
        values = [entry[group] for entry in per_round if entry[group] is not None]
        summary[group] = round(common.percentile(values, 0.5), 1) if values else None
    summary["total"] = round(sum(v for v in summary.values() if v is not None), 1)
    return summary


def _phase_results(figures: dict, rounds: int) -> dict:
    rates = figures["rates"]
    median = {kind: common.percentile(rates[kind], 0.5) for kind in KINDS}
    cpu = {kind: _cpu_summary(figures["cpu_ms_per_1000"][kind]) for kind in KINDS}
    return {
        "tasks_per_second": {kind: common.summarize(rates[kind], 1) for kind in KINDS},
        "ratio_of_medians": round(median["signal_aware"] / median["plain"], 3),
        "paired_ratio": common.summarize(figures["paired_ratios"], 3),
        "cpu_ms_per_1000_tasks": cpu,
        # Where the throughput ratio tends when the CPUs are the bottleneck.
        "cpu_ratio": (
            round(cpu["plain"]["total"] / cpu["signal_aware"]["total"], 3)
            if cpu["signal_aware"]["total"]
            else None
        ),
        "rounds": [
            {kind: round(rates[kind][i], 1) for kind in KINDS}
            | {"ratio": round(figures["paired_ratios"][i], 3)}
            for i in range(rounds)
        ],
    }


def measure(
    *,
    rounds: int,
    tasks: int,
    warmup: int,
    records_off: bool = True,
    output_dir=None,
) -> common.Measured:
    """Measure on a worker, then (``records_off``) on one that records no runs."""
    from django.conf import settings

    from benchmarks import tasks as bench_tasks
    from tasksignal.models import TaskRun

    task_of = {"signal_aware": bench_tasks.noop_signal_aware, "plain": bench_tasks.noop_plain}
    sizes = {"rounds": rounds, "tasks": tasks, "warmup": warmup}
    with common.benchmark_worker(NAME, output_dir) as worker:
        main = measure_phase(worker, task_of, **sizes)
    log_path = worker.log_path
    # The worker has stopped: every run record it had queued is written (or lost).
    records_written = TaskRun.objects.filter(task_id__in=main["ids"]["signal_aware"]).count()
    common.delete_records(main["ids"]["signal_aware"] + main["warmup_ids"])
    runtimes = _worker_runtimes(log_path.read_text(errors="replace"))
    worker_log = common.worker_log_problems(log_path)

    results = _phase_results(main, rounds)
    worker_us = {
        kind: [runtimes[task_id] * 1e6 for task_id in main["ids"][kind] if task_id in runtimes]
        for kind in KINDS
    }
    results["worker_runtime_us"] = {kind: common.summarize(worker_us[kind], 1) for kind in KINDS}
    results["worker_runtime_overhead_us"] = (
        round(
            common.percentile(worker_us["signal_aware"], 0.5)
            - common.percentile(worker_us["plain"], 0.5),
            1,
        )
        if worker_us["signal_aware"] and worker_us["plain"]
        else None
    )
    results["run_records"] = {
        "enabled": settings.TASKSIGNAL_RECORD_RUNS,
        "expected": len(main["ids"]["signal_aware"]) if settings.TASKSIGNAL_RECORD_RUNS else 0,
        "written": records_written,
    }
    plain_base = type(bench_tasks.noop_plain).__mro__[1]
    results["plain_task_class"] = f"{plain_base.__module__}.{plain_base.__qualname__}"
    results["concurrency"] = 2
    results["prefetch_multiplier"] = settings.CELERY_WORKER_PREFETCH_MULTIPLIER

    if records_off:
        name = f"{NAME}-records-off"
        off_env = {"TASKSIGNAL_RECORD_RUNS": "False"}
        with common.benchmark_worker(name, output_dir, env=off_env) as off_worker:
            off = measure_phase(off_worker, task_of, **sizes)
        common.delete_records(off["ids"]["signal_aware"] + off["warmup_ids"])
        results["records_off"] = _phase_results(off, rounds)
        off_log = common.worker_log_problems(off_worker.log_path)
        for key in ("warnings", "errors", "redelivered"):
            worker_log[key] = (worker_log[key] or 0) + (off_log[key] or 0)
        worker_log["examples"] += off_log["examples"]

    targets = [
        common.target(
            "throughput ratio (medians)", results["ratio_of_medians"], ">=", MIN_RATIO, "x"
        )
    ]
    notes = [
        "Throughput is measured by the driver (first send to last result over Redis), so it"
        " includes the broker and the result backend, and the driver shares the machine's CPUs.",
        "worker_runtime_us is Celery's own runtime of each task from the worker log: the task"
        " base's cost per task without the broker.",
        "cpu_ms_per_1000_tasks counts CPU time of the worker processes and of this database's"
        " PostgreSQL backends (null when PostgreSQL is not on this machine).",
        "Rounds alternate which kind goes first; paired_ratio compares the two kinds within each"
        " round, which cancels slow drifts of the machine's load.",
    ]
    if not targets[0]["passed"]:
        notes.append(
            "Target missed: compare records_off (no run records) and cpu_ms_per_1000_tasks to"
            " see whether the run records or the per-task begin and end cost the difference."
        )
    return common.Measured(results, targets, notes, worker_log)


def _worker_runtimes(log_text: str) -> dict[str, float]:
    """Celery's runtime in seconds of each task that succeeded, by task id, from a worker log."""
    return {match["id"]: float(match["seconds"]) for match in SUCCEEDED.finditer(log_text)}


def report(payload: dict, path) -> None:
    """Print the short table of a result."""
    results = payload["results"]
    rows = []
    for kind in KINDS:
        rate = results["tasks_per_second"][kind]
        cpu = results["cpu_ms_per_1000_tasks"][kind]
        rows.append(
            [
                kind,
                rate["p50"],
                rate["min"],
                rate["max"],
                results["worker_runtime_us"][kind]["p50"],
                cpu["total"],
                cpu["postgres"],
            ]
        )
    if "records_off" in results:
        off = results["records_off"]
        for kind in KINDS:
            rate = off["tasks_per_second"][kind]
            cpu = off["cpu_ms_per_1000_tasks"][kind]
            label = f"{kind} (records off)"
            rows.append(
                [label, rate["p50"], rate["min"], rate["max"], None, cpu["total"], cpu["postgres"]]
            )
    headers = ["task", "tasks/s p50", "min", "max", "worker µs p50", "CPU ms/1000", "of it PG"]
    common.print_table("throughput: no-op tasks, prefork concurrency 2", headers, rows)
    print(
        f"  ratio of medians {results['ratio_of_medians']}, paired ratio p50"
        f" {results['paired_ratio']['p50']} (min {results['paired_ratio']['min']},"
        f" max {results['paired_ratio']['max']}); run records"
        f" {results['run_records']['written']}/{results['run_records']['expected']}"
    )
    print(f"  CPU ratio (plain / signal-aware CPU per task) {results['cpu_ratio']}")
    if "records_off" in results:
        off = results["records_off"]
        print(
            f"  records off: ratio of medians {off['ratio_of_medians']},"
            f" CPU ratio {off['cpu_ratio']}"
        )
    common.print_targets(payload)
    print(f"  -> {path}")


def markdown(result: dict) -> list[str]:
    """The README's Markdown rows for the throughput benchmark."""
    r = result["results"]
    rows = [
        "| no-op task, prefork concurrency 2 | tasks/s p50 (min, max) | CPU ms per 1000 tasks"
        " (of it PostgreSQL) | worker runtime µs p50 |",
        "|---|---:|---:|---:|",
    ]
    phases = [("", r)] + ([(", run records off", r["records_off"])] if "records_off" in r else [])
    labels = {"signal_aware": "`SignalAwareTask`", "plain": "plain Celery task (baseline)"}
    for suffix, phase in phases:
        for kind in ("signal_aware", "plain"):
            rate = phase["tasks_per_second"][kind]
            cpu = phase["cpu_ms_per_1000_tasks"][kind]
            runtime = r["worker_runtime_us"][kind]["p50"] if not suffix else None
            rows.append(
                f"| {labels[kind]}{suffix} | {fmt(rate['p50'])} ({fmt(rate['min'])}, "
                f"{fmt(rate['max'])}) | {fmt(cpu['total'], 0)} ({fmt(cpu['postgres'], 0)})"
                f" | {fmt(runtime, 0)} |"
            )
    rows.append("")
    rows.append(
        f"Throughput ratio (medians) **{fmt(r['ratio_of_medians'], 3)}**, target"
        f" {target_cell(result, 'throughput ratio (medians)')}; paired rounds"
        f" {fmt(r['paired_ratio']['min'], 3)} to {fmt(r['paired_ratio']['max'], 3)}; CPU ratio"
        f" {fmt(r['cpu_ratio'], 3)}."
        + (
            f" Without run records: ratio {fmt(r['records_off']['ratio_of_medians'], 3)},"
            f" CPU ratio {fmt(r['records_off']['cpu_ratio'], 3)}."
            if "records_off" in r
            else ""
        )
    )
    return rows


if __name__ == "__main__":
    common.main(sys.modules[__name__])
