"""The task's side of signalling: what happens inside the process that executes a run.

The process keeps no thread and no connection of its own for signalling. When a
signal-aware run begins it finds its mailbox on the worker node's board (``board.py``),
which the node allocated before handing the task to the pool, and reports there that it
runs (pid, thread). From then on:

* ``checkpoint()`` compares one byte of the mailbox (its *attention* counter) with the last
  value the run saw: a memory read. When it changed, the run reads the signals the node
  posted and acts on them: raise :class:`~tasksignal.exceptions.TaskCancelled`, pause, or
  run a registered handler; what it handled it reports back as *acks*.
* ``set_progress()`` writes the progress into the mailbox; the node records it.
* An interrupt arrives as ``SIGUSR2`` from the node (billiard keeps ``SIGUSR1`` for Celery's
  soft time limit). The handler raises only if the node's interrupt counter in *this* run's
  mailbox moved and the run has not finished, so a late signal can never hit the next task.

In ``solo`` and ``threads`` pools the node lives in the same process; the same mailboxes
serve, and the node interrupts a run in a pool thread with an asynchronous exception.

>>> this_thread.run is None   # outside a task
True
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

from tasksignal import board as boards
from tasksignal.exceptions import TaskCancelled
from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK, get_signal_kind
from tasksignal.states import Outcome

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from tasksignal.base import SignalAwareTask

#: What ``add_cleanup`` keeps: the callback and its arguments.
Cleanup = tuple[Callable[..., object], tuple[Any, ...], dict[str, Any]]

logger = logging.getLogger(__name__)

INTERRUPT_SIGNAL = signal.SIGUSR2
#: The environment variable through which a worker node tells its pool processes where its
#: board is (set in the main process before the pool starts, so children inherit it).
BOARD_VARIABLE = "TASKSIGNAL_BOARD"
#: Seconds between two looks at the mailbox while a run is paused.
PAUSE_POLL = 0.02


class Run:
    """One execution of a signal-aware task in this process.

    ``view[attention_at] != attention_seen`` is the whole cost of a checkpoint with
    nothing pending. ``finished`` is set the moment the body stops; no interrupt may land
    after it.
    """

    __slots__ = (
        "attention_at",
        "attention_seen",
        "cancel",
        "cleanups",
        "finished",
        "inbox",
        "interrupted",
        "interrupts_seen",
        "mailbox",
        "progress",
        "progress_due",
        "seen",
        "state",
        "task_id",
        "task_name",
        "view",
    )

    def __init__(self, task_id: str, task_name: str, mailbox: boards.Mailbox | None) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.mailbox = mailbox
        # A run without a mailbox (no node in this worker) watches a byte that never moves.
        self.view = mailbox.view if mailbox is not None else memoryview(b"\0")
        self.attention_at = mailbox.attention_at if mailbox is not None else 0
        self.attention_seen = self.view[self.attention_at]
        self.interrupts_seen = mailbox.interrupts() if mailbox is not None else 0
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.seen: set[int] = set()
        self.cancel: dict[str, Any] | None = None
        self.interrupted = False
        self.finished = False
        self.cleanups: list[Cleanup] = []
        self.state: dict[str, Any] = {}
        # reported, not yet written to the mailbox
        self.progress: tuple[float, float | None, str] | None = None
        self.progress_due = 0.0

    @property
    def attention(self) -> bool:
        """Whether the node posted something since the run last looked."""
        return self.view[self.attention_at] != self.attention_seen


class ThisThread(threading.local):
    """What runs in the current thread: ``this_thread.run`` is its :class:`Run`, or ``None``.

    A ``threading.local`` with a class default, so that reading it is one attribute lookup
    done in C: ``checkpoint()`` reads it every time.
    """

    run: Run | None = None


#: The run of the current thread (prefork and solo pools: of the process).
this_thread = ThisThread()


class Runtime:
    """This process's signalling state; use the module's :data:`runtime`."""

    def __init__(self) -> None:
        self._board: boards.Board | None = None
        self._board_pid: int | None = None
        self._warned = False
        #: True in prefork pool processes, where reaping subprocesses cannot hit the worker.
        self.is_pool_child = False

    def board(self) -> boards.Board | None:
        """The node's board, mapped once per process (again after a fork)."""
        if self._board_pid != os.getpid():
            path = os.environ.get(BOARD_VARIABLE)
            self._board = boards.Board.open(Path(path)) if path else None
            self._board_pid = os.getpid() if self._board is not None else None
            if self._board is None and not self._warned:
                self._warned = True
                logger.warning(
                    "no tasksignal node in this worker (add tasksignal.node.NodeStep to the "
                    "app's worker steps): signal-aware tasks run but cannot be signalled"
                )
        return self._board

    # -- the run's life ---------------------------------------------------------------
    def begin(self, task_id: str, task_name: str) -> Run:
        """Make ``task_id`` this thread's run, report it to the node, take pending signals."""
        board = self.board()
        mailbox = board.mailbox(task_id) if board is not None else None
        run = Run(task_id, task_name, mailbox)
        # Installed per run, not once: billiard may reset handlers between tasks.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(INTERRUPT_SIGNAL) is not _raise_if_interrupted
        ):
            signal.signal(INTERRUPT_SIGNAL, _raise_if_interrupted)
        this_thread.run = run
        if mailbox is not None:
            mailbox.report(
                pid=os.getpid(),
                thread_ident=threading.get_ident(),
                run_state=boards.RUNNING,
                started=time.time(),
                backend_pid=_backend_pid(),
            )
            self.take_signals(run)
            if run.inbox:
                # Signals posted before the run began (a pause sent while it was queued):
                # taking them marked the attention seen, so no checkpoint would act on
                # them; a value the attention byte never holds makes the first one act.
                run.attention_seen = -1
        return run

    def end(self, run: Run, stop_outcome: str = "") -> None:
        """End ``run``: nothing may be raised into it any more.

        A run stopped by a cancel says how (``stop_outcome``) and wakes the node, which
        completes the cancel at once, before the worker acknowledges the task's message.
        """
        run.finished = True
        if run.mailbox is not None:
            if run.progress is not None:
                run.mailbox.report_progress(*run.progress)
            run.mailbox.report(run_state=boards.ENDED, stop_outcome=stop_outcome)
            if stop_outcome:
                run.mailbox.wake_node()
        this_thread.run = None

    @staticmethod
    def report_progress(run: Run, current: float, total: float | None, message: str) -> None:
        """Note ``run``'s progress; write it to the mailbox at most every ``POLL_INTERVAL``
        (the node would not read it sooner), and at the end of the run."""
        now = time.monotonic()
        if now < run.progress_due:
            run.progress = (current, total, message)
            return
        run.progress, run.progress_due = None, now + boards.POLL_INTERVAL
        _mailbox(run).report_progress(current, total, message)

    def take_signals(self, run: Run) -> None:
        """Move signals the node posted and the run has not seen yet into its inbox."""
        if run.mailbox is None:
            return
        run.attention_seen, signals = run.mailbox.read_signals()
        for payload in signals:
            if payload["id"] in run.seen:
                continue
            run.seen.add(payload["id"])
            if payload["signal"] == CANCEL_TASK and run.cancel is None:
                run.cancel = payload
            run.inbox.append(payload)

    def handle_attention(self, task: SignalAwareTask, run: Run) -> None:
        """Act on what the node posted for ``run``: raise, pause, or run custom handlers."""
        self.take_signals(run)
        while run.inbox:
            payload = run.inbox.popleft()
            kind = payload["signal"]
            if kind == CANCEL_TASK:
                raise TaskCancelled(run.task_id, Outcome.COOPERATIVE, payload.get("message", ""))
            if kind == PAUSE_TASK:
                self._pause(task, run, payload)
            elif kind == RESUME_TASK:
                _mailbox(run).ack(payload["id"], Outcome.NOT_PAUSED)
            else:
                self._run_handler(task, run, payload)
        if run.cancel is not None:  # a cancel keeps raising until it is honoured
            raise TaskCancelled(run.task_id, Outcome.COOPERATIVE, run.cancel.get("message", ""))

    def _pause(self, task: SignalAwareTask, run: Run, payload: dict[str, Any]) -> None:
        mailbox = _mailbox(run)
        mailbox.report(run_state=boards.PAUSED)
        mailbox.ack(payload["id"], Outcome.PAUSED)
        try:
            while True:
                while not run.attention:
                    time.sleep(PAUSE_POLL)  # an interrupt still lands here
                self.take_signals(run)
                while run.inbox:
                    waiting = run.inbox.popleft()
                    kind = waiting["signal"]
                    if kind == CANCEL_TASK:
                        message = waiting.get("message", "")
                        raise TaskCancelled(run.task_id, Outcome.COOPERATIVE, message)
                    if kind == RESUME_TASK:
                        mailbox.ack(waiting["id"], Outcome.RESUMED)
                        return
                    if kind == PAUSE_TASK:
                        mailbox.ack(waiting["id"], Outcome.PAUSED)
                    else:
                        self._run_handler(task, run, waiting)
        finally:
            mailbox.report(run_state=boards.RUNNING)
            mailbox.wake_node()

    def _run_handler(self, task: SignalAwareTask, run: Run, payload: dict[str, Any]) -> None:
        from tasksignal.models import CeleryTaskSignal

        kind = get_signal_kind(payload["signal"])
        if kind.handler is None:  # the built-in kinds are handled before this is called
            raise RuntimeError(f"signal {kind.name} has no handler to run")
        row = CeleryTaskSignal(
            pk=payload["id"],
            task_id=run.task_id,
            signal=payload["signal"],
            message=payload.get("message", ""),
        )
        if payload.get("truncated"):
            row.refresh_from_db(fields=["message"])
        try:
            kind.handler(task, row)
        except Exception as exc:
            logger.exception("handler for signal %s of task %s failed", kind.name, run.task_id)
            _mailbox(run).ack(payload["id"], Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        else:
            _mailbox(run).ack(payload["id"], Outcome.HANDLED)

    def note_connection(self, backend_pid: int) -> None:
        """Report the database backend a run's new connection talks to (the node cancels its
        query if it has to kill the run)."""
        run = this_thread.run
        if run is not None and run.mailbox is not None:
            run.mailbox.report(backend_pid=backend_pid)

    def reap_subprocesses(self, timeout: float = 1.0) -> None:
        """Terminate (then kill) the processes this task started; prefork children only."""
        if not self.is_pool_child or not _has_children():
            return
        children = psutil.Process().children(recursive=True)
        for child in children:
            child.terminate()
        _, alive = psutil.wait_procs(children, timeout=timeout)
        for child in alive:
            child.kill()


def _backend_pid() -> int:
    """The PostgreSQL backend of this thread's open default connection, or 0."""
    from django.db import connection

    raw = connection.connection
    return raw.info.backend_pid if raw is not None and not raw.closed else 0


def _has_children() -> bool:
    """Whether this process has children; on Linux read from /proc, not a process-table scan."""
    files = list(Path(f"/proc/{os.getpid()}/task").glob("*/children"))
    if not files:
        return True  # no such files on this system: let psutil look
    try:
        return any(path.read_text().strip() for path in files)
    except OSError:
        return True


def _mailbox(run: Run) -> boards.Mailbox:
    """``run``'s mailbox: only runs the node posted something to, which have one, get here."""
    if run.mailbox is None:
        raise RuntimeError(f"run {run.task_id} has no mailbox")
    return run.mailbox


def _raise_if_interrupted(signum: int, frame: FrameType | None) -> None:
    """``SIGUSR2`` handler: raise into the task only if the node asked to interrupt this run."""
    run = this_thread.run
    if run is None or run.finished or run.mailbox is None:
        return
    requested = run.mailbox.interrupts()
    if requested == run.interrupts_seen:
        return
    run.interrupts_seen = requested
    run.interrupted = True
    runtime.take_signals(run)
    raise TaskCancelled(run.task_id, Outcome.INTERRUPTED, (run.cancel or {}).get("message", ""))


#: The runtime of this process.
runtime = Runtime()


def connect_worker_signals() -> None:
    """Mark prefork children and report the database backends their runs connect to."""
    from celery.signals import worker_process_init
    from django.db.backends.signals import connection_created

    worker_process_init.connect(_on_worker_process_init, weak=False)
    connection_created.connect(_on_connection_created, weak=False)


def _on_worker_process_init(**kwargs: object) -> None:
    runtime.is_pool_child = True


def _on_connection_created(
    sender: object, connection: BaseDatabaseWrapper, **kwargs: object
) -> None:
    if this_thread.run is not None and connection.vendor == "postgresql":
        runtime.note_connection(connection.connection.info.backend_pid)
