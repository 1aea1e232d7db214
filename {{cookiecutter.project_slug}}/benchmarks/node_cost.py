"""What signalling costs a worker node, against plain Celery, at several concurrencies.

For each concurrency (2, 24 and 64 prefork processes by default) one worker runs two task
kinds of the same shape, ``tasks.STEPS`` steps of ``tasks.STEP_SECONDS``: a
``SignalAwareTask`` calling ``checkpoint()`` and ``set_progress()`` every step (nothing is
cancelled), and a plain Celery task that only sleeps. Rounds alternate the kinds; each
round sends at least ``tasks_per_round`` tasks (a whole number per pool process) and waits
for every result.

Figures per concurrency:

* ``cpu_ms_per_task``: CPU time of the worker's processes (main and pool, read from the
  operating system around each round) per task, median over rounds; ``ratio`` is
  signal-aware over plain, the target. ``main_ms_per_task`` is the main process's part.
* ``node_connections``: PostgreSQL sessions held by the worker's processes while they run
  signal-aware tasks that use no database (so every one of them is the node's), and while
  idle.
* ``connections_opened_per_1000_tasks``: sessions the database saw open during the
  measured rounds (``pg_stat_database.sessions``), per 1000 tasks.
* ``idle_transactions_per_s``: transactions in the database per second while the worker
  holds no task (its node should cause none), and ``idle_cpu_ms_per_s`` of the worker.

Targets: ratio ≤ 1.10, at most 2 node connections, at most 10 connections opened per 1000
tasks, at each concurrency.

    python -m benchmarks.node_cost [--quick] [--concurrencies N ...] [--rounds N]
"""

import sys
import time
from pathlib import Path

import psutil

from benchmarks import common

NAME = "node_cost"
DESCRIPTION = "worker CPU per task and PostgreSQL connections, signal-aware vs plain"
DEFAULTS = {"concurrencies": (2, 24, 64), "rounds": 4, "tasks_per_round": 64, "idle_s": 5.0}
QUICK = {"concurrencies": (2,), "rounds": 1, "tasks_per_round": 4, "idle_s": 1.0}
SIZES_HELP = {
    "concurrencies": "worker concurrencies to measure at, one worker each",
    "rounds": "rounds of each kind per concurrency",
    "tasks_per_round": "at least this many tasks per round and kind",
    "idle_s": "seconds the idle worker is watched",
}
MAX_RATIO = 1.10
MAX_NODE_CONNECTIONS = 2
MAX_OPENED_PER_1000 = 10
KINDS = ("signal_aware", "plain")


def _worker_cpu(worker) -> dict[str, float]:
    """CPU seconds so far of the worker's main process and of its pool processes."""
    main = psutil.Process(worker.process.pid).cpu_times()
    pool = 0.0
    for pid in worker.child_pids():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        pool += times.user + times.system
    return {"main": main.user + main.system, "pool": pool}


def _sessions_held(worker) -> int:
    """PostgreSQL sessions held by the worker's processes (by local port: a socket a pool
    process inherited is the same session)."""
    from django.db import connection

    server_port = int(connection.settings_dict["PORT"] or 5432)
    ports = set()
    for pid in [worker.process.pid, *worker.child_pids()]:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        ports |= {c.laddr.port for c in connections if c.raddr and c.raddr.port == server_port}
    return len(ports)


def _database_counters() -> tuple[int, int]:
    """(transactions, sessions) of this database so far, as PostgreSQL counts them."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
        return cursor.fetchone()


def _run_round(task, count: int, while_running=None) -> list[str]:
    """Send ``count`` runs of ``task`` and wait for them; call ``while_running()`` half a run
    in (every pool process busy). Returns the task ids."""
    from celery.result import ResultSet

    from benchmarks import tasks

    results = ResultSet([task.apply_async() for _ in range(count)])
    if while_running is not None:
        time.sleep(min(tasks.STEPS * tasks.STEP_SECONDS / 2, 1.0))
        while_running()
    results.get(timeout=max(120.0, count))
    ids = [result.id for result in results.results]
    results.forget()
    return ids


def measure_at(concurrency: int, *, rounds: int, tasks_per_round: int, idle_s: float, output_dir):
    """Every figure of one concurrency; returns them with the ids of the tasks it ran."""
    from benchmarks import tasks

    task_of = {"signal_aware": tasks.steps_signal_aware, "plain": tasks.steps_plain}
    # A whole number of tasks per process, at least tasks_per_round in all.
    count = concurrency * max(1, -(-tasks_per_round // concurrency))
    figures = {kind: [] for kind in KINDS}
    main_figures = {kind: [] for kind in KINDS}
    ids: list[str] = []
    name = f"{NAME}-{concurrency}"
    with common.benchmark_worker(name, output_dir, concurrency=concurrency) as worker:
        for kind in KINDS:  # every process forked and warm
            ids += _run_round(task_of[kind], concurrency)
        time.sleep(1.0)  # the node writes the warm-up's records
        transactions, _ = _database_counters()
        cpu = _worker_cpu(worker)
        time.sleep(idle_s)
        idle_cpu = sum(_worker_cpu(worker).values()) - sum(cpu.values())
        idle_transactions = _database_counters()[0] - transactions - 1  # our own read
        idle_sessions = _sessions_held(worker)
        _, sessions_before = _database_counters()
        busy_sessions = []

        def note_sessions() -> None:  # every process busy: what does the node hold?
            busy_sessions.append(_sessions_held(worker))

        for number in range(rounds):
            for kind in KINDS if number % 2 == 0 else KINDS[::-1]:
                before = _worker_cpu(worker)
                probe = note_sessions if kind == "signal_aware" else None
                ids += _run_round(task_of[kind], count, probe)
                after = _worker_cpu(worker)
                used = {part: after[part] - before[part] for part in after}
                figures[kind].append(1000 * sum(used.values()) / count)
                main_figures[kind].append(1000 * used["main"] / count)
        _, sessions_after = _database_counters()
    cpu_ms = {kind: common.percentile(figures[kind], 0.5) for kind in KINDS}
    measured_tasks = rounds * count * len(KINDS)
    return {
        "concurrency": concurrency,
        "tasks_per_round": count,
        "cpu_ms_per_task": {kind: round(cpu_ms[kind], 3) for kind in KINDS},
        "cpu_ms_per_task_rounds": {k: [round(v, 3) for v in figures[k]] for k in KINDS},
        "main_ms_per_task": {
            kind: round(common.percentile(main_figures[kind], 0.5), 3) for kind in KINDS
        },
        "ratio": round(cpu_ms["signal_aware"] / cpu_ms["plain"], 3),
        "node_connections": {"busy": max(busy_sessions, default=0), "idle": idle_sessions},
        "connections_opened_per_1000_tasks": round(
            1000 * (sessions_after - sessions_before) / measured_tasks, 2
        ),
        "idle_transactions_per_s": round(max(idle_transactions, 0) / idle_s, 2),
        "idle_cpu_ms_per_s": round(1000 * idle_cpu / idle_s, 1),
        "log": str(worker.log_path),
    }, ids


def measure(
    *,
    concurrencies,
    rounds: int,
    tasks_per_round: int,
    idle_s: float,
    output_dir=None,
) -> common.Measured:
    """Measure at each concurrency in turn."""
    results, targets, ids, logs = {}, [], [], []
    for concurrency in concurrencies:
        figures, run_ids = measure_at(
            concurrency,
            rounds=rounds,
            tasks_per_round=tasks_per_round,
            idle_s=idle_s,
            output_dir=output_dir,
        )
        ids += run_ids
        logs.append(figures.pop("log"))
        results[str(concurrency)] = figures
        label = f"at concurrency {concurrency}"
        targets += [
            common.target(f"CPU ratio {label}", figures["ratio"], "<=", MAX_RATIO, "x"),
            common.target(
                f"node connections {label}",
                figures["node_connections"]["busy"],
                "<=",
                MAX_NODE_CONNECTIONS,
            ),
            common.target(
                f"connections opened per 1000 tasks {label}",
                figures["connections_opened_per_1000_tasks"],
                "<=",
                MAX_OPENED_PER_1000,
            ),
        ]
    common.delete_records(ids)
    worker_log = common.worker_log_problems(Path(logs[0]))
    notes = [
        "CPU is that of the worker's processes only (main and pool); the driver, Redis and"
        " PostgreSQL are not in it. The plain task does strictly less: it sleeps its steps.",
        "Both kinds run on the same worker in alternating rounds; the ratio compares medians.",
        "node_connections.busy is sampled while every pool process runs a signal-aware task"
        " that opens no connection, so each session counted is the node's own.",
    ]
    return common.Measured(
        results,
        targets,
        notes,
        worker_log,
        parameters={"task_shape": "15 steps of 20 ms; checkpoint() and set_progress() each step"},
    )


def report(payload: dict, path) -> None:
    """Print the short table of a result."""
    rows = []
    for concurrency, figures in payload["results"].items():
        cpu = figures["cpu_ms_per_task"]
        rows.append(
            [
                concurrency,
                cpu["plain"],
                cpu["signal_aware"],
                figures["ratio"],
                figures["node_connections"]["busy"],
                figures["connections_opened_per_1000_tasks"],
                figures["idle_transactions_per_s"],
            ]
        )
    headers = ["processes", "plain ms", "signal-aware ms", "ratio", "node conns", "opened/1000"]
    common.print_table(
        "node cost: worker CPU per task (15 x 20 ms steps)", [*headers, "idle xact/s"], rows
    )
    common.print_targets(payload)
    print(f"  -> {path}")


if __name__ == "__main__":
    common.main(sys.modules[__name__])
