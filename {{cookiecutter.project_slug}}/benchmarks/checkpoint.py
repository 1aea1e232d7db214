"""Cost of ``SignalAwareTask.checkpoint()`` with nothing pending, against ``is_aborted()``.

Both are timed inside real tasks on a real prefork worker: ``checkpoint_cost`` (a
signal-aware task) and ``is_aborted_cost`` (a ``celery.contrib.abortable.AbortableTask``)
each time batches of calls with :mod:`timeit` and return the nanoseconds per
call. The two tasks alternate, round after round, so a noisy moment of the machine hits
both. Figures are medians over all batches and include the loop (``empty_call_ns`` is what
a loop calling an empty function costs, for reference).

On a busy machine a batch's elapsed time includes moments when another process had the
CPU. ``checkpoint_cpu_ns`` (the task thread's CPU time, ``time.thread_time_ns()``) leaves
them out, and so does the fastest batch (``min``). ``is_aborted()`` mostly waits for Redis,
so only its elapsed time means anything.

Target: a checkpoint costs at most 1 µs and at least 100 times less than ``is_aborted()``.

    python -m benchmarks.checkpoint [--quick] [--rounds N] [--batches N] [--calls N] ...
"""

import sys

from benchmarks import common
from benchmarks.common import fmt, target_cell

NAME = "checkpoint"
DESCRIPTION = "checkpoint() with nothing pending vs AbortableTask.is_aborted(), in-task"
DEFAULTS = {
    "rounds": 6,
    "batches": 50,
    "calls": 20_000,
    "aborted_batches": 10,
    "aborted_calls": 200,
}
QUICK = {"rounds": 2, "batches": 3, "calls": 2_000, "aborted_batches": 3, "aborted_calls": 20}
SIZES_HELP = {
    "rounds": "rounds, each timing both tasks in turn",
    "batches": "batches of checkpoint() calls per round",
    "calls": "checkpoint() calls per batch",
    "aborted_batches": "batches of is_aborted() per round",
    "aborted_calls": "is_aborted() calls per batch",
}
MAX_CHECKPOINT_NS = 1000.0
MIN_RATIO = 100.0


def measure(
    *,
    rounds: int,
    batches: int,
    calls: int,
    aborted_batches: int,
    aborted_calls: int,
    output_dir=None,
) -> common.Measured:
    """Time both calls inside running tasks, round after round."""
    from benchmarks import tasks

    checkpoint_batches: list[float] = []
    checkpoint_cpu: list[float] = []
    aborted_figures: list[float] = []
    empty_batches: list[float] = []
    rounds_table = []
    in_run = True
    task_ids = []
    with common.benchmark_worker(NAME, output_dir) as worker:
        for number in range(rounds):
            # Alternate which goes first, so neither always follows the other.
            order = (
                ("checkpoint", "is_aborted") if number % 2 == 0 else ("is_aborted", "checkpoint")
            )
            figures = {}
            for kind in order:
                if kind == "checkpoint":
                    result = tasks.checkpoint_cost.delay(calls, batches)
                else:
                    result = tasks.is_aborted_cost.delay(aborted_calls, aborted_batches)
                task_ids.append(result.id)
                figures[kind] = result.get(timeout=300)
                result.forget()
            checkpoint_batches += figures["checkpoint"]["per_call_ns"]
            checkpoint_cpu += figures["checkpoint"]["per_call_cpu_ns"]
            aborted_figures += figures["is_aborted"]["per_call_ns"]
            empty_batches += figures["checkpoint"]["empty_call_ns"]
            in_run = in_run and figures["checkpoint"]["in_run"] and figures["is_aborted"]["in_run"]
            rounds_table.append(
                {
                    "round": number + 1,
                    "checkpoint_ns": round(
                        common.percentile(figures["checkpoint"]["per_call_ns"], 0.5), 1
                    ),
                    "is_aborted_ns": round(
                        common.percentile(figures["is_aborted"]["per_call_ns"], 0.5), 1
                    ),
                }
            )
    log_path = worker.log_path
    common.delete_records(task_ids)

    checkpoint_ns = common.percentile(checkpoint_batches, 0.5)
    aborted_ns = common.percentile(aborted_figures, 0.5)
    ratio = aborted_ns / checkpoint_ns if checkpoint_ns else None
    results = {
        "checkpoint_ns_per_call": common.summarize(checkpoint_batches, 1),
        "checkpoint_cpu_ns_per_call": common.summarize(checkpoint_cpu, 1),
        "is_aborted_ns_per_call": common.summarize(aborted_figures, 1),
        "empty_call_ns_per_call": common.summarize(empty_batches, 1),
        "checkpoint_ns": round(checkpoint_ns, 1),
        "checkpoint_cpu_ns": round(common.percentile(checkpoint_cpu, 0.5), 1),
        "is_aborted_ns": round(aborted_ns, 1),
        "ratio_is_aborted_over_checkpoint": round(ratio, 1) if ratio else None,
        # The fastest batch of each: closest to the intrinsic cost on a busy machine.
        "ratio_of_minimums": round(min(aborted_figures) / min(checkpoint_batches), 1),
        "measured_in_running_task": in_run,
        "rounds": rounds_table,
    }
    targets = [
        common.target(
            "checkpoint cost per call (p50)",
            results["checkpoint_ns"],
            "<=",
            MAX_CHECKPOINT_NS,
            "ns",
        ),
        common.target(
            "is_aborted / checkpoint (p50)",
            results["ratio_is_aborted_over_checkpoint"],
            ">=",
            MIN_RATIO,
            "x",
        ),
        common.target("measured inside running tasks", 1.0 if in_run else 0.0, ">=", 1.0),
    ]
    notes = [
        "Per-call figures are medians over batches of timed calls and include the Python loop;"
        " empty_call_ns_per_call is the same loop calling an empty function.",
        "checkpoint_cpu_ns_per_call is the task thread's CPU time per call: on a busy machine it"
        " leaves out the time other processes had the CPU, which the elapsed figure includes.",
        "is_aborted() reads the task's state from the result backend (one Redis GET per call).",
        "Tasks alternate within each round; the spread across rounds shows the machine's noise.",
    ]
    return common.Measured(results, targets, notes, common.worker_log_problems(log_path))


def report(payload: dict, path) -> None:
    """Print the short table of a result."""
    results = payload["results"]
    rows = [
        ["checkpoint()", *_row(results["checkpoint_ns_per_call"])],
        ["checkpoint() CPU time", *_row(results["checkpoint_cpu_ns_per_call"])],
        ["is_aborted()", *_row(results["is_aborted_ns_per_call"])],
        ["empty call", *_row(results["empty_call_ns_per_call"])],
    ]
    common.print_table(
        "checkpoint: ns per call inside a running task",
        ["call", "p50", "min", "max", "batches"],
        rows,
    )
    print(f"  is_aborted / checkpoint = {results['ratio_is_aborted_over_checkpoint']}x")
    common.print_targets(payload)
    print(f"  -> {path}")


def _row(summary: dict) -> list:
    return [summary["p50"], summary["min"], summary["max"], summary["n"]]


def markdown(result: dict) -> list[str]:
    """The README's Markdown rows for the checkpoint benchmark."""
    r = result["results"]
    return [
        "| call, inside a running task | ns per call (p50) | fastest batch | target |",
        "|---|---:|---:|---|",
        f"| `checkpoint()`, nothing pending | {fmt(r['checkpoint_ns'])}"
        f" | {fmt(r['checkpoint_ns_per_call']['min'])}"
        f" | {target_cell(result, 'checkpoint cost per call (p50)')} |",
        f"| `checkpoint()`, task thread's CPU time | {fmt(r.get('checkpoint_cpu_ns'))}"
        f" | {fmt((r.get('checkpoint_cpu_ns_per_call') or {}).get('min'))} | |",
        f"| `AbortableTask.is_aborted()` (baseline) | {fmt(r['is_aborted_ns'], 0)}"
        f" | {fmt(r['is_aborted_ns_per_call']['min'], 0)} | |",
        f"| ratio is_aborted / checkpoint | {fmt(r['ratio_is_aborted_over_checkpoint'], 0)}x"
        f" | {fmt(r.get('ratio_of_minimums'), 0)}x"
        f" | {target_cell(result, 'is_aborted / checkpoint (p50)')} |",
    ]


if __name__ == "__main__":
    common.main(sys.modules[__name__])
