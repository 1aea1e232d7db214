"""Benchmark-only tasks; benchmark workers load them with ``--include benchmarks.tasks``.

Each signal-aware task has a plain Celery twin of the same shape, the baseline it is
measured against. Tasks that get cancelled or revoked write a ``started`` marker (with
their pid) before the part being measured, so the driver acts only once they really run.
The cooperative and interrupted shapes also stamp the moment their cleanup starts (a
``cleanup`` marker), which splits a cancel's latency into delivery and the rest.
"""

import os
import time
import timeit

from celery import shared_task
from celery.contrib.abortable import AbortableTask

from benchmarks.common import mark
from tasksignal import shapes
from tasksignal.base import SignalAwareTask
from tasksignal.runtime import this_thread

#: ``cancel_grace`` of the cancel-latency tasks: the interrupt comes this long after a cancel.
CANCEL_GRACE = 0.2
#: ``kill_after`` of the cancel-latency tasks: the node kills this long after a cancel.
KILL_AFTER = 1.0
#: Sleep between two checkpoints of the cooperative task.
COOPERATIVE_STEP = 0.001
#: Far more than can run before a kill: ``sum(range(GIL_N))`` holds the GIL for minutes.
GIL_N = 10**11


def _stamp_cleanup(task_id: str) -> None:
    """Cleanup callback: record the wall-clock time at which the cancel reached the task."""
    mark(task_id, "cleanup", wall=time.time())


def _nothing() -> None:
    """An empty function: what a loop of calls costs by itself."""


def _per_call_ns(function, calls: int, batches: int, clock=time.perf_counter_ns) -> list[float]:
    """Nanoseconds per call of ``function()``, one figure per batch of ``calls`` calls.

    :mod:`timeit` does the timing (its loop, garbage collection off while it times), on
    ``clock``: elapsed time by default, ``time.thread_time_ns`` for this thread's CPU time,
    which leaves out the moments another process had the CPU.

    >>> figures = _per_call_ns(_nothing, calls=1000, batches=3)
    >>> len(figures), all(ns > 0 for ns in figures)
    (3, True)
    """
    timer = timeit.Timer(function, timer=clock)
    return [total / calls for total in timer.repeat(repeat=batches, number=calls)]


def _time_batches(function, calls: int, batches: int) -> dict:
    """Time ``batches`` batches of ``calls`` calls of ``function``: elapsed, CPU, and what
    the same loop calling an empty function costs (the harness's share of each figure)."""
    return {
        "per_call_ns": _per_call_ns(function, calls, batches),
        "per_call_cpu_ns": _per_call_ns(function, calls, batches, clock=time.thread_time_ns),
        "empty_call_ns": _per_call_ns(_nothing, calls, batches),
        "calls": calls,
        "batches": batches,
        "pid": os.getpid(),
    }


# -- checkpoint ------------------------------------------------------------------------
@shared_task(base=SignalAwareTask, bind=True)
def checkpoint_cost(self, calls: int, batches: int) -> dict:
    """Time ``batches`` batches of ``calls`` calls of ``self.checkpoint()``, nothing pending.

    ``in_run`` proves that the calls took the path of a running task (a current run with
    nothing pending), not the shortcut taken outside a task.
    """
    run = this_thread.run
    figures = _time_batches(self.checkpoint, calls, batches)
    figures["in_run"] = run is not None and run.task_id == self.request.id and not run.attention
    return figures


@shared_task(base=AbortableTask, bind=True)
def is_aborted_cost(self, calls: int, batches: int) -> dict:
    """Time ``batches`` batches of ``calls`` calls of ``self.is_aborted()`` (a backend read)."""
    figures = _time_batches(self.is_aborted, calls, batches)
    figures["in_run"] = not self.request.called_directly
    return figures


# -- throughput ------------------------------------------------------------------------
@shared_task(base=SignalAwareTask, bind=True)
def noop_signal_aware(self) -> None:
    """Do nothing, as a signal-aware task (run record, slot, begin and end)."""


@shared_task
def noop_plain() -> None:
    """Do nothing, as a plain Celery task (the project's default task class)."""


# -- worker node cost -----------------------------------------------------------------
#: The shape of the node-cost tasks: STEPS steps of STEP_SECONDS each.
STEPS, STEP_SECONDS = 15, 0.02


@shared_task(base=SignalAwareTask, bind=True)
def steps_signal_aware(self, steps: int = STEPS, step_seconds: float = STEP_SECONDS) -> int:
    """Work in steps with a checkpoint and a progress report each: a typical signal-aware task."""
    return shapes.cooperate(self, steps, step_seconds)


@shared_task
def steps_plain(steps: int = STEPS, step_seconds: float = STEP_SECONDS) -> int:
    """The same steps as a plain Celery task: the baseline."""
    for _ in range(steps):
        time.sleep(step_seconds)
    return steps


# -- cancel latency --------------------------------------------------------------------
@shared_task(base=SignalAwareTask, bind=True, cancel_grace=CANCEL_GRACE, kill_after=KILL_AFTER)
def cooperative_loop(self, seconds: float = 60.0) -> None:
    """Check for signals every ``COOPERATIVE_STEP`` seconds: a cancel stops it cooperatively."""
    self.add_cleanup(_stamp_cleanup, self.request.id)
    mark(self.request.id, "started")
    shapes.cooperate(self, steps=round(seconds / COOPERATIVE_STEP), step_seconds=COOPERATIVE_STEP)


@shared_task(base=SignalAwareTask, bind=True, cancel_grace=CANCEL_GRACE, kill_after=KILL_AFTER)
def sleeping(self, seconds: float = 60.0) -> None:
    """Sleep without a checkpoint: a cancel interrupts it after ``cancel_grace``."""
    self.add_cleanup(_stamp_cleanup, self.request.id)
    mark(self.request.id, "started")
    shapes.sleep(seconds)


@shared_task(base=SignalAwareTask, bind=True, cancel_grace=CANCEL_GRACE, kill_after=KILL_AFTER)
def holding_gil(self, n: int = GIL_N) -> int:
    """Run C code that holds the GIL: a cancel ends in a kill after ``kill_after``."""
    mark(self.request.id, "started")
    return shapes.hold_the_gil(n)


@shared_task(bind=True)
def plain_sleeping(self, seconds: float = 60.0) -> None:
    """The ``sleeping`` shape as a plain task; marks ``stopped`` if its body is unwound."""
    mark(self.request.id, "started")
    try:
        shapes.sleep(seconds)
    finally:
        mark(self.request.id, "stopped")


@shared_task(bind=True)
def plain_holding_gil(self, n: int = GIL_N) -> int:
    """The ``holding_gil`` shape as a plain task; marks ``stopped`` if its body is unwound."""
    mark(self.request.id, "started")
    try:
        return shapes.hold_the_gil(n)
    finally:
        mark(self.request.id, "stopped")
