"""Cancel latency of each step of the ladder, against ``revoke(terminate=True)``.

Each trial starts one task on a prefork worker (concurrency 2), waits until the task
says it runs (a ``started`` marker with its pid, written by the task body), then stops it.

Ladder (``CeleryTaskSignal.objects.cancel``), one shape per step:

``cooperative``
    ``cooperative_loop`` checks for signals every millisecond.
``interrupted``
    ``sleeping`` is in ``time.sleep`` with ``cancel_grace`` = ``tasks.CANCEL_GRACE``.
``killed``
    ``holding_gil`` runs ``sum(range(...))`` (C code holding the GIL) with ``kill_after`` =
    ``tasks.KILL_AFTER``.

Latency is ``completed_at - created`` of the signal row, both stamped by the database
clock: from the cancel being recorded to the task having stopped (cleanup done, or the
process killed). The driver polls the row every few milliseconds only to know when to
read it; its polling does not enter the figure.

Baseline: ``app.control.revoke(task_id, terminate=True, signal=...)`` with SIGTERM (the
default) and SIGKILL, on plain-task twins of the ``interrupted`` and ``killed`` shapes.
Measured by the driver's clock from the ``revoke()`` call, polling every millisecond:

* ``to_revoked_ms``: until the result backend says ``REVOKED``. Celery writes that state
  right after sending the signal, so it is no proof that the task stopped;
* ``to_stopped_ms``: until the task stopped: its body unwound (a ``stopped`` marker
  written by its ``finally:`` block) or its process is gone (or a zombie).

A trial that has not stopped after ``STOP_TIMEOUT`` seconds counts as not stopped; the
benchmark then kills that pool process itself. A second ``revoke`` would not: Celery
already counts the task as ended and answers "terminate: tasks unknown", while the process
keeps its CPU and its pool slot until the hard time limit.
"Right process" means the process that stopped is the one that ran the task and the
worker's other child survived.

Targets: cooperative p99 ≤ 50 ms; interrupted p99 ≤ cancel_grace + 50 ms; killed p99 ≤
kill_after + 200 ms; every ladder trial ends with the expected outcome in the right process.

    python -m benchmarks.cancel_latency [--quick] [--cooperative N] [--interrupted N] ...
"""

import os
import signal as signal_module
import sys
import time

import psutil

from benchmarks import common
from benchmarks.common import fmt, target_cell
from tasksignal.states import Outcome

NAME = "cancel_latency"
DESCRIPTION = "cancel to stop, per ladder step, vs revoke(terminate=True)"
DEFAULTS = {"cooperative": 30, "interrupted": 20, "killed": 10, "revoke": 8, "revoke_gil_term": 2}
QUICK = {"cooperative": 2, "interrupted": 2, "killed": 1, "revoke": 1, "revoke_gil_term": 1}
SIZES_HELP = {
    "cooperative": "trials of the cooperative step",
    "interrupted": "trials of the interrupted step",
    "killed": "trials of the killed step",
    "revoke": "trials of each revoke(terminate=True) case",
    "revoke_gil_term": "trials of SIGTERM on C code (each waits)",
}
COOPERATIVE_P99_MS = 50.0
INTERRUPT_MARGIN_MS = 50.0
KILL_MARGIN_MS = 200.0
#: Seconds a revoke trial waits for the task to stop before giving up on it.
STOP_TIMEOUT = 3.0
#: Worker log lines that the benchmark causes on purpose (not problems).
EXPECTED_LOG = ("tasksignal.node: killed pid",)
#: Seconds between two reads of a signal row while waiting for its completion.
ROW_POLL_INTERVAL = 0.002


def _process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def _others_alive(pids: list[int]) -> bool:
    return all(not _process_gone(pid) for pid in pids)


#: Pool processes stopped by earlier trials; some linger a moment before they exit, and
#: must not count as "another child" that a later trial could hit.
_stopped_pids: set[int] = set()


def _start(client, worker, task, **kwargs) -> tuple:
    """Start ``task`` and wait until it runs; return (result, its pid, the other children)."""
    result = task.apply_async(kwargs=kwargs)
    pid = common.wait_for_mark(client, result.id, "started", timeout=60.0)["pid"]
    others = [
        child
        for child in worker.child_pids()
        if child != pid and child not in _stopped_pids and not _process_gone(child)
    ]
    return result, pid, others


def _state(backend, task_id: str) -> str:
    """The state the result backend holds for ``task_id`` now (never a cached one)."""
    return backend.get_task_meta(task_id, cache=False)["status"]


def _wait_for_state(backend, task_id: str, state: str, timeout: float) -> str:
    """Poll the result backend until ``task_id`` is in ``state``; return the last state read."""
    deadline = time.monotonic() + timeout
    while True:
        current = _state(backend, task_id)
        if current == state or time.monotonic() >= deadline:
            return current
        time.sleep(0.005)


def ladder_trial(client, worker, task, step: str, timeout: float) -> dict:
    """Cancel one running task through tasksignal; return its figures."""
    from tasksignal.models import CeleryTaskSignal

    result, pid, others = _start(client, worker, task)
    called = time.perf_counter()
    row = CeleryTaskSignal.objects.cancel(result.id, message="benchmark")
    rows = CeleryTaskSignal.objects.filter(pk=row.pk, completed=True)
    done = common.poll(
        lambda: rows.values("created", "completed_at", "outcome").first(),
        timeout=timeout,
        interval=ROW_POLL_INTERVAL,
    )
    observed_ms = (time.perf_counter() - called) * 1000
    state = _wait_for_state(result.backend, result.id, "REVOKED", timeout=5.0)
    trial = {
        "task_id": result.id,
        "pid": pid,
        "outcome": done["outcome"] if done else None,
        "latency_ms": (
            round((done["completed_at"] - done["created"]).total_seconds() * 1000, 2)
            if done
            else None
        ),
        "observed_by_driver_ms": round(observed_ms, 2),
        "final_state": state,
        # A killed process takes a moment to be torn down; one that lives on is not waited for.
        "process_killed": common.poll(
            lambda: _process_gone(pid),
            timeout=2.0 if done and done["outcome"] == Outcome.KILLED else 0.0,
        )
        is not None,
        "other_children_alive": _others_alive(others),
    }
    cleanup = common.read_mark(client, result.id, "cleanup")
    if done and cleanup:
        # Wall clock of this machine against the database's: valid for a local PostgreSQL only.
        trial["to_cleanup_ms"] = round((cleanup["wall"] - done["created"].timestamp()) * 1000, 2)
        trial["cleanup_to_completed_ms"] = round(
            (done["completed_at"].timestamp() - cleanup["wall"]) * 1000, 2
        )
    if trial["process_killed"]:
        _stopped_pids.add(pid)
    trial["right_process"] = (
        trial["outcome"] == step
        and trial["other_children_alive"]
        and trial["process_killed"] == (step == Outcome.KILLED)
    )
    result.forget()
    return trial


def revoke_trial(client, worker, task, signal: str) -> dict:
    """Stop one running plain task with ``revoke(terminate=True)``; return its figures."""
    from celery import current_app

    result, pid, others = _start(client, worker, task)
    backend = result.backend
    called = time.perf_counter()
    current_app.control.revoke(result.id, terminate=True, signal=signal)
    revoked_ms = stopped_ms = None
    stopped_by = None
    deadline = called + STOP_TIMEOUT
    while time.perf_counter() < deadline and (revoked_ms is None or stopped_ms is None):
        if revoked_ms is None and _state(backend, result.id) == "REVOKED":
            revoked_ms = (time.perf_counter() - called) * 1000
        if stopped_ms is None:
            if _process_gone(pid):
                stopped_by = "process gone"
            elif common.read_mark(client, result.id, "stopped") is not None:
                stopped_by = "body unwound"
            if stopped_by is not None:
                stopped_ms = (time.perf_counter() - called) * 1000
        time.sleep(0.001)
    trial = {
        "task_id": result.id,
        "pid": pid,
        "signal": signal,
        "to_revoked_ms": round(revoked_ms, 2) if revoked_ms is not None else None,
        "to_stopped_ms": round(stopped_ms, 2) if stopped_ms is not None else None,
        "stopped": stopped_ms is not None,
        "stopped_by": stopped_by,
        "other_children_alive": _others_alive(others),
    }
    trial["right_process"] = trial["stopped"] and trial["other_children_alive"]
    _stopped_pids.add(pid)
    if not trial["stopped"]:
        # Celery already counts the task as ended: a second revoke finds no request to
        # terminate, and the process would hold its pool slot until the time limit.
        os.kill(pid, signal_module.SIGKILL)
        common.poll(lambda: _process_gone(pid), timeout=10.0, interval=0.01)
    result.forget()
    return trial


def measure(
    *,
    cooperative: int,
    interrupted: int,
    killed: int,
    revoke: int,
    revoke_gil_term: int,
    output_dir=None,
) -> common.Measured:
    """Cancel tasks at each step of the ladder, then revoke(terminate=True) plain ones."""
    from benchmarks import tasks

    client = common.redis_client()
    ladder = {
        Outcome.COOPERATIVE: (tasks.cooperative_loop, cooperative, 5.0),
        Outcome.INTERRUPTED: (tasks.sleeping, interrupted, 5.0),
        Outcome.KILLED: (tasks.holding_gil, killed, tasks.KILL_AFTER + 10.0),
    }
    baselines = {
        "sleep_SIGTERM": (tasks.plain_sleeping, "SIGTERM", revoke),
        "sleep_SIGKILL": (tasks.plain_sleeping, "SIGKILL", revoke),
        "gil_SIGTERM": (tasks.plain_holding_gil, "SIGTERM", revoke_gil_term),
        "gil_SIGKILL": (tasks.plain_holding_gil, "SIGKILL", revoke),
    }
    ladder_trials: dict[str, list[dict]] = {step: [] for step in ladder}
    revoke_trials: dict[str, list[dict]] = {name: [] for name in baselines}
    with common.benchmark_worker(NAME, output_dir) as worker:
        # Interleave the steps and the baselines, so a noisy minute hits all of them.
        schedule = [
            ("ladder", step, i) for step, (_, count, _) in ladder.items() for i in range(count)
        ]
        schedule += [
            ("revoke", name, i) for name, (_, _, count) in baselines.items() for i in range(count)
        ]
        schedule.sort(key=lambda item: (item[2], item[0], item[1]))
        for family, name, _ in schedule:
            if family == "ladder":
                task, _, timeout = ladder[name]
                ladder_trials[name].append(ladder_trial(client, worker, task, name, timeout))
            else:
                task, signal, _ = baselines[name]
                revoke_trials[name].append(revoke_trial(client, worker, task, signal))
    log_path = worker.log_path
    common.delete_records([t["task_id"] for trials in ladder_trials.values() for t in trials])

    results = {"ladder": {}, "revoke_terminate": {}}
    for step, trials in ladder_trials.items():
        latencies = [t["latency_ms"] for t in trials if t["latency_ms"] is not None]
        results["ladder"][step] = {
            "latency_ms": common.summarize(latencies, 1),
            "outcomes": _count(t["outcome"] for t in trials),
            "final_states": _count(t["final_state"] for t in trials),
            "right_process": sum(t["right_process"] for t in trials),
            "trials": len(trials),
            "observed_by_driver_ms": common.summarize(
                [t["observed_by_driver_ms"] for t in trials], 1
            ),
        }
        if any("to_cleanup_ms" in t for t in trials):
            results["ladder"][step]["breakdown_ms"] = {
                "created_to_cleanup": common.summarize(
                    [t["to_cleanup_ms"] for t in trials if "to_cleanup_ms" in t], 1
                ),
                "cleanup_to_completed": common.summarize(
                    [
                        t["cleanup_to_completed_ms"]
                        for t in trials
                        if "cleanup_to_completed_ms" in t
                    ],
                    1,
                ),
            }
    for name, trials in revoke_trials.items():
        results["revoke_terminate"][name] = {
            "to_revoked_ms": common.summarize(
                [t["to_revoked_ms"] for t in trials if t["to_revoked_ms"] is not None], 1
            ),
            "to_stopped_ms": common.summarize(
                [t["to_stopped_ms"] for t in trials if t["to_stopped_ms"] is not None], 1
            ),
            "stopped": sum(t["stopped"] for t in trials),
            "stopped_by": _count(t["stopped_by"] for t in trials),
            "right_process": sum(t["right_process"] for t in trials),
            "trials": len(trials),
        }
    results["trials"] = {"ladder": ladder_trials, "revoke_terminate": revoke_trials}

    ladder_results = results["ladder"]
    targets = [
        common.target(
            "cooperative p99",
            ladder_results[Outcome.COOPERATIVE]["latency_ms"]["p99"],
            "<=",
            COOPERATIVE_P99_MS,
            "ms",
        ),
        common.target(
            "interrupted p99",
            ladder_results[Outcome.INTERRUPTED]["latency_ms"]["p99"],
            "<=",
            tasks.CANCEL_GRACE * 1000 + INTERRUPT_MARGIN_MS,
            "ms",
        ),
        common.target(
            "killed p99",
            ladder_results[Outcome.KILLED]["latency_ms"]["p99"],
            "<=",
            tasks.KILL_AFTER * 1000 + KILL_MARGIN_MS,
            "ms",
        ),
    ]
    for step, figures in ladder_results.items():
        share = figures["right_process"] / figures["trials"] if figures["trials"] else None
        targets.append(
            common.target(f"{step}: expected outcome, right process", share, ">=", 1.0, "of trials")
        )
    notes = [
        "Ladder latencies come from the database clock (signal row's created to completed_at).",
        "revoke() figures come from the driver's clock, polling every millisecond; to_revoked_ms"
        " is when the backend said REVOKED (written right after the signal is sent, not proof of"
        " a stop), to_stopped_ms when the body unwound or the process was gone.",
        f"A revoke trial not stopped within {STOP_TIMEOUT}s counts as not stopped;"
        " SIGTERM cannot stop C code holding the GIL (Python handlers run between bytecodes).",
        "Trials of every kind are interleaved; the machine's other load shows in the p99s.",
        "breakdown_ms splits cooperative and interrupted latencies at the task's first cleanup"
        " callback (host wall clock against the database clock, so only valid with a local"
        " PostgreSQL): created_to_cleanup is delivery (commit, publish, listener, checkpoint or"
        " interrupt), cleanup_to_completed is the rest of the cleanup (reaping subprocesses) and"
        " the row update.",
    ]
    return common.Measured(
        results,
        targets,
        notes,
        common.worker_log_problems(log_path, expected=EXPECTED_LOG),
        parameters={
            "cancel_grace_s": tasks.CANCEL_GRACE,
            "kill_after_s": tasks.KILL_AFTER,
            "checkpoint_every_s": tasks.COOPERATIVE_STEP,
            "stop_timeout_s": STOP_TIMEOUT,
        },
    )


def _count(values) -> dict:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def report(payload: dict, path) -> None:
    """Print the short table of a result."""
    results = payload["results"]
    rows = []
    for step, figures in results["ladder"].items():
        latency = figures["latency_ms"]
        rows.append(
            [
                f"cancel: {step}",
                latency["p50"],
                latency["p99"],
                f"{figures['right_process']}/{figures['trials']}",
                ", ".join(f"{k} {v}" for k, v in figures["outcomes"].items()),
            ]
        )
    for name, figures in results["revoke_terminate"].items():
        stopped = figures["to_stopped_ms"]
        rows.append(
            [
                f"revoke: {name}",
                stopped["p50"],
                stopped["p99"],
                f"{figures['right_process']}/{figures['trials']}",
                f"stopped {figures['stopped']}/{figures['trials']}; REVOKED after"
                f" {figures['to_revoked_ms']['p50']} ms (p50)",
            ]
        )
    headers = ["how", "p50 ms", "p99 ms", "right process", "outcome"]
    common.print_table("cancel latency: cancel to stop", headers, rows)
    common.print_targets(payload)
    print(f"  -> {path}")


def markdown(result: dict) -> list[str]:
    """The README's Markdown rows for the cancel-latency benchmark."""
    r = result["results"]
    p = result["parameters"]
    rows = [
        "| how the task is stopped | shape | p50 ms | p99 ms | stopped, right process | target |",
        "|---|---|---:|---:|---|---|",
    ]
    shapes = {
        Outcome.COOPERATIVE: f"checkpoint every {p['checkpoint_every_s'] * 1000:g} ms",
        Outcome.INTERRUPTED: f"`time.sleep`, cancel_grace {p['cancel_grace_s']:g} s",
        Outcome.KILLED: f"`sum(range(...))` holding the GIL, kill_after {p['kill_after_s']:g} s",
    }
    for step, figures in r["ladder"].items():
        latency = figures["latency_ms"]
        verdict = target_cell(result, f"{step} p99")
        rows.append(
            f"| cancel → {step} | {shapes[step]} | {fmt(latency['p50'])} | {fmt(latency['p99'])}"
            f" | {figures['right_process']}/{figures['trials']} | {verdict} |"
        )
    revoke_shapes = {"sleep": "`time.sleep`", "gil": "`sum(range(...))` holding the GIL"}
    for case, figures in r["revoke_terminate"].items():
        shape, signal = case.split("_", 1)
        stopped = figures["to_stopped_ms"]
        rows.append(
            f"| `revoke(terminate=True, signal={signal})` (baseline) | {revoke_shapes[shape]}"
            f" | {fmt(stopped['p50'])} | {fmt(stopped['p99'])}"
            f" | {figures['stopped']}/{figures['trials']} stopped,"
            f" {figures['right_process']}/{figures['trials']} right process"
            f" (REVOKED shown after {fmt(figures['to_revoked_ms']['p50'])} ms p50) | |"
        )
    return rows


if __name__ == "__main__":
    common.main(sys.modules[__name__])
