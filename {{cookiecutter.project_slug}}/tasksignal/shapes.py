"""The shapes of work a cancel must stop, one each, for your own tests and benchmarks.

Each rung of the ladder meets a different kind of body: one that checkpoints (stopped
``cooperative``), one asleep in ``time.sleep`` or blocked on a socket (``interrupted``: no
checkpoint, but Python runs its signal handler), one in C code holding the GIL
(``killed``: nothing inside the process can run), and a sibling beside them that nobody
cancels and whose result proves it was not harmed. These are those bodies, as plain
functions of the running task; the demo's tasks, the test suite's and the benchmarks' call
them, each with the options (``cancel_grace``, ``kill_after``) and names it needs. Yours
can too::

    from celery import shared_task

    from tasksignal import shapes
    from tasksignal.base import SignalAwareTask


    @shared_task(base=SignalAwareTask, bind=True, cancel_grace=0.3)
    def asleep(self, seconds: float = 60.0) -> float:
        return shapes.sleep(seconds)  # cancelled: stopped `interrupted` after 0.3 s

Outside a task, ``checkpoint()`` and ``set_progress()`` do nothing, so the examples below
run anywhere.
"""

import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasksignal.base import SignalAwareTask


def cooperate(task: "SignalAwareTask", steps: int, step_seconds: float) -> int:
    """``steps`` steps of ``step_seconds``, a checkpoint and progress at each: a cancel stops
    it ``cooperative`` at the next step. Returns the steps done.

    >>> from tasksignal.base import SignalAwareTask
    >>> cooperate(SignalAwareTask(), steps=3, step_seconds=0.0)
    3
    """
    for step in range(steps):
        task.checkpoint()
        time.sleep(step_seconds)
        task.set_progress(step + 1, steps)
    return steps


def sleep(seconds: float) -> float:
    """One long ``time.sleep``, no checkpoint: only the interrupt stops it early.

    >>> sleep(0.0)
    0.0
    """
    time.sleep(seconds)
    return seconds


def block_on_socket(task: "SignalAwareTask", seconds: float) -> str:
    """Block reading a socket nobody writes to (as a slow HTTP call does) for up to
    ``seconds``: only the interrupt stops it early, and the sockets close as it unwinds.

    >>> from tasksignal.base import SignalAwareTask
    >>> block_on_socket(SignalAwareTask(), seconds=0.01)
    'timed out'
    """
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(seconds)
        try:
            reader.recv(1)
        except TimeoutError:
            return "timed out"
    return "read"


def hold_the_gil(n: int) -> int:
    """``sum(range(n))``: C code that never releases the GIL, so no thread of the process runs
    until it returns; only the kill from the worker's main process stops it.

    >>> hold_the_gil(10)
    45
    """
    return sum(range(n))


def sibling(task: "SignalAwareTask", seed: int, steps: int, step_seconds: float) -> int:
    """The task nobody cancels, started next to the others: it must return
    ``seed * 2 + steps``, whatever happened around it.

    >>> from tasksignal.base import SignalAwareTask
    >>> sibling(SignalAwareTask(), seed=40, steps=2, step_seconds=0.0)
    82
    """
    total = seed * 2
    for _ in range(steps):
        task.checkpoint()
        time.sleep(step_seconds)
        total += 1
    return total
