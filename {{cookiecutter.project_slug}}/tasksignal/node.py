"""The worker node's side of signalling: one runtime per ``celery worker``, in its main process.

A worker node is one ``celery worker`` command: a main process and its pool. The node
runtime lives in the main process, which already knows which pool process runs which
request, so the cost of signalling follows the number of signals, not of processes:

* **Admission** (from ``SignalAwareRequest.revoked()``): when Celery is about to hand a task
  to the pool, the node holds it back and its thread starts to ``LISTEN`` on the task's
  channel (``notify.py``) and, in the same round trip, one indexed query tells whether a
  cancel waits for it. The worker's event loop goes on meanwhile; the answer comes back
  through it: if a cancel waits, the task is skipped and no pool process sees it;
  otherwise the run gets a mailbox on the node's board (``board.py``), with any signal
  already pending in it, and the task goes to the pool.
* **Listening**: a signal reaches this node the moment its row commits, and only if the node
  holds the task. Every ``TASKSIGNAL_RECONCILE_INTERVAL`` one query reads the pending
  signals of the node's tasks (not of the whole table), covering reconnects.
* **Delivery**: the node posts a run's signals into its mailbox; the run sees them at its
  next ``checkpoint()`` (a memory read) and reports what it handled back through it.
* **Escalation**: ``cancel_grace`` after the node delivered a cancel, it asks the run to
  interrupt itself (``SIGUSR2``, or an asynchronous exception in a pool thread); at
  ``kill_after`` the main thread kills the process in isolation (``kill.py``).
* **Records and outcomes**: the node's thread writes every outcome and every ``TaskRun``
  record. The admission statement itself completes a skip; a kill is completed while the
  process is frozen; a run stopped by a cancel reports its rung in its mailbox and wakes the
  thread, which completes the cancel before the main thread lets Celery acknowledge the
  message; pause, resume, registered kinds and the run records go in batches, four times a
  second.

All database work happens on one PostgreSQL connection, the node thread's, whatever the
node's concurrency. The main thread runs the worker's event loop, which every message of
the node goes through, so it never waits for the database: it hands the thread what must
be answered before Celery moves on (an admission, a stop's outcome written) and the
answer comes back as an event of the loop (``ANSWER_TIMEOUT`` at most; only a kill's
outcome is waited for, while the process is frozen, and everything is waited for with
pools that have no event loop: solo, threads). Pool processes hold no connection for
signalling. Add the node to the Celery app (``config/celery.py`` does)::

    app.steps["worker"].add(NodeStep)

``celery -A config inspect tasksignal`` shows what each node holds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import datetime
import fcntl
import logging
import os
import queue
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from celery import bootsteps
from celery.signals import task_received
from celery.worker import state as worker_state
from celery.worker.components import Pool
from celery.worker.control import inspect_command
from django.db import connections

from tasksignal import board as boards
from tasksignal import broker, conf, lineage, notify, results, sql
from tasksignal.broker import guard_redis_transport
from tasksignal.kill import kill_if_running
from tasksignal.registry import CANCEL_TASK
from tasksignal.runtime import BOARD_VARIABLE, INTERRUPT_SIGNAL
from tasksignal.states import RECORDED_HEADER, Outcome, RunState

if TYPE_CHECKING:
    from tasksignal.exceptions import RunStopped

#: A worker's request for a task message (``SignalAwareRequest`` for signal-aware tasks).
#: ``Any``: celery-types' ``Request`` mistypes what the node reads (``worker_pid`` as ``str``).
Request = Any

logger = logging.getLogger(__name__)

#: Seconds between two writes of run records (one statement each).
RECORD_FLUSH_INTERVAL = 0.5
#: Seconds between two looks of the main thread at ended runs and kills to do.
MAIN_TICK = 0.1
#: Seconds before trying again a kill that could not be done yet (the run not started).
KILL_RETRY = 0.1
#: Seconds to wait before reconnecting to PostgreSQL after an error.
RECONNECT_DELAY = 0.5
#: Seconds between two refreshes of what ``celery inspect tasksignal`` answers (at most:
#: an idle node is not woken for it).
SNAPSHOT_INTERVAL = 0.5
#: How early periodic work (mailbox polls, reconcile, records) is done when the node's
#: thread is awake for something else: fewer wake-ups, each of which costs cold CPU.
EARLY = 0.1
#: Seconds between two batches of ``UNLISTEN`` for the tasks that ended.
UNLISTEN_INTERVAL = 1.0
#: Mailboxes per task the pool can hold at once (the board's load factor).
MAILBOXES_PER_SLOT = 4
#: Seconds the main thread gives the node's thread to answer (an admission, an outcome
#: written) before it carries on without: the task is admitted unchecked, or Celery
#: acknowledges the message while the node keeps retrying the write.
ANSWER_TIMEOUT = 2.0
#: What the main thread writes on the wake-up pipe (runs write their mailbox index).
WAKE_FOR_EVENTS = struct.pack("<i", -1)
#: The node's database errors: the server gone, a broken connection.
DATABASE_ERRORS = (psycopg.Error, OSError)
#: Unfinished run records a starting node checks against the result backend (newest first).
RECOVERY_LIMIT = 10_000
#: A queued run whose record is this old (seconds) and whose message Redis does not hold
#: lost it; it is looked for twice, LOST_RECHECK seconds apart.
LOST_AFTER = 5.0
LOST_RECHECK = 1.0

_current: Node | None = None


def current() -> Node | None:
    """The node of this worker process, or ``None`` (not a worker, or no ``NodeStep``)."""
    return _current


@dataclass
class Admission:
    """A request the main thread handed to the pool (main thread only)."""

    request: Request
    index: int | None
    killed: bool = False


@dataclass
class Question:
    """What the main thread asked the node's thread without waiting (main thread only)."""

    deadline: float  # monotonic clock
    on_answer: Callable[[object], None]  # called with the answer, or None at the deadline


@dataclass
class Observed:
    """A task that is not signal-aware, with a run record to keep (main thread only)."""

    request: Request
    started: bool = False


@dataclass
class Tracked:
    """What the node's thread knows of a task it holds (node thread only)."""

    task_id: str
    task_name: str
    index: int | None
    cancel_grace: float = 0.0
    kill_after: float = 0.0
    signals: dict[int, dict[str, Any]] = field(default_factory=dict)
    cancel: dict[str, Any] | None = None
    cancel_created: float = 0.0  # monotonic clock
    started: float | None = None  # monotonic clock
    pid: int | None = None
    interrupt_at: float | None = None
    kill_at: float | None = None
    run_seq: int = -1
    run_state: int = boards.WAITING
    progress: tuple[float | None, float | None, str] | None = None
    stop_recorded: bool = False


class Node:
    """The signalling runtime of one worker node; see the module docstring."""

    def __init__(self, hostname: str, capacity: int) -> None:
        self.hostname = hostname
        self.pid = os.getpid()
        # A pipe the node's thread waits on: the main thread writes -1 when it has events,
        # a run that ended writes its mailbox index (4 bytes, so each write is atomic).
        self._wake_read, self._wake_write = _nonblocking_pipe()
        # And one the worker's event loop watches: the thread has answers for it.
        self._answer_read, self._answer_write = _nonblocking_pipe()
        self.board = boards.Board.create(
            boards.board_path(self.pid), capacity, wake_fd=self._wake_write
        )
        # Pool processes inherit the environment: this is how they find the board.
        os.environ[BOARD_VARIABLE] = str(self.board.path)
        self.record_runs = conf.get("TASKSIGNAL_RECORD_RUNS")
        self.done_channel = notify.done_channel()
        self.reconcile_interval = conf.get("TASKSIGNAL_RECONCILE_INTERVAL")
        self.worker: Any = None  # the WorkController, from start()
        self._hub: Any = None
        #: How many signal notifications reached this node (each for a task it holds).
        self.notices = 0
        #: What ``celery inspect tasksignal`` answers; replaced whole by the node's thread.
        self.snapshot: dict[str, Any] = {}
        # Main thread.
        self._admitted: dict[str, Admission] = {}
        self._observed: dict[str, Observed] = {}
        self._orphans_settled = False
        self._requeued: set[str] = set()
        self._records_checked = False
        #: Queued runs to look for in the broker after recovery (id: task name); after the
        #: first look, only those it did not find.
        self._lost_candidates: dict[str, str] = {}
        self._lost_looked_once = False
        self._application = f"tasksignal node {hostname}"[:63]
        self._questions: dict[tuple[str, str], Question] = {}
        # Main thread -> node thread; the thread is woken only while it sleeps.
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sleeping = False
        self._sleep_until = 0.0
        # Node thread -> main thread: stops whose outcome is written (the main thread may
        # then let Celery acknowledge the message), the answers it waits for, kills to do.
        self._stops_written: set[str] = set()
        self._stop_waiters: dict[str, concurrent.futures.Future[Any]] = {}
        self._answers: collections.deque[tuple[tuple[str, str], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._kills: collections.deque[str] = collections.deque()
        # Node thread.
        self._db: psycopg.Connection | None = None
        self._db_fd: int | None = None
        self._maybe_notified = False
        self._tracked: dict[str, Tracked] = {}
        self._listening: set[str] = set()
        self._to_unlisten: set[str] = set()
        # Ended runs keep their channel one more UNLISTEN batch: a signal sent just after
        # the end is still heard and settled too_late instead of staying pending.
        self._unlisten_later: set[str] = set()
        self._woken: set[int] = set()
        self._completions: dict[tuple[str, str, str], list[Any]] = {}
        self._ended: list[str] = []
        self._records: dict[str, dict[str, Any]] = {}
        self._next = dict.fromkeys(
            ("poll", "reconcile", "flush", "snapshot", "unlisten", "recover", "lost"), 0.0
        )
        self._reconnect_at = 0.0
        self._outage = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        os.register_at_fork(after_in_child=self._forget_in_child)

    # -- lifecycle (main thread) -------------------------------------------------------
    def start(self, worker: Any) -> None:
        """Start the node's thread; ``worker`` is the worker (its pool carries out kills,
        its event loop, when it has one, receives the thread's answers)."""
        global _current
        self.worker = worker
        self._hub = getattr(worker, "hub", None)
        self._watch_answers()
        _current = self
        self._thread = threading.Thread(target=self._run, name="tasksignal-node", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (it writes what it still holds first) and remove the board."""
        global _current
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        _current = None
        self._stopped = True
        self.board.close(remove=True)
        if self._hub is not None:
            self._hub.remove_reader(self._answer_read)
        for fd in (self._wake_read, self._wake_write, self._answer_read, self._answer_write):
            os.close(fd)

    def _forget_in_child(self) -> None:
        """In a pool process: close what it inherited of the node but must never use (the
        board, and the write end of the wake-up pipe, it keeps: that is how runs talk)."""
        if self._stopped:
            return
        for fd in (self._db_fd, self._wake_read, self._answer_read, self._answer_write):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _wake(self) -> None:
        # A full pipe means the thread has wake-ups pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, WAKE_FOR_EVENTS)

    def _push(self, *event: object, urgent: bool = True) -> None:
        """Hand an event to the node's thread; wake it only if ``urgent`` (others wait for
        its next wake-up: each costs the thread a few hundred microseconds of cold CPU)."""
        self._events.put(event)
        # A non-urgent event still waits at most about a flush interval: an idle node may
        # plan to sleep for an hour (nothing tracked), and a record must not wait that long.
        if self._sleeping and (
            urgent or self._sleep_until > time.monotonic() + RECORD_FLUSH_INTERVAL
        ):
            self._wake()

    def _ask(self, kind: str, task_id: str, *details: object) -> Any:
        """Have the node's thread do ``kind`` now and wait for its answer; ``None`` if it
        cannot answer within ``ANSWER_TIMEOUT`` (no database, say)."""
        answer: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._push(kind, task_id, answer, *details)
        return _result(answer)

    # -- answers through the worker's event loop (main thread) ---------------------------
    def _watch_answers(self) -> None:
        # The consumer resets the loop's readers when it reconnects to the broker: checked
        # again every tick.
        if self._hub is not None and self._answer_read not in self._hub.readers:
            self._hub.add_reader(self._answer_read, self._take_answers)

    def _when_answered(
        self,
        key: tuple[str, str],
        answer: concurrent.futures.Future[Any],
        on_answer: Callable[[Any], None],
    ) -> None:
        """Call ``on_answer(result)`` in the main thread once the future ``answer`` is done,
        or ``on_answer(None)`` after ``ANSWER_TIMEOUT``; only once either way."""
        self._questions[key] = Question(time.monotonic() + ANSWER_TIMEOUT, on_answer)
        answer.add_done_callback(lambda done: self._to_main(key, done))

    def _to_main(self, key: tuple[str, str], answer: concurrent.futures.Future[Any]) -> None:
        """Any thread: hand an answer to the event loop (it wakes on the pipe)."""
        self._answers.append((key, answer))
        with contextlib.suppress(BlockingIOError):  # full: the loop has a wake-up pending
            os.write(self._answer_write, b"!")

    def _take_answers(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._answer_read, 4096)
        while self._answers:
            key, answer = self._answers.popleft()
            question = self._questions.pop(key, None)
            if question is not None:  # else it timed out: carried on without
                question.on_answer(None if answer.exception() else answer.result())

    def _expire_questions(self, now: float) -> None:
        for key in [key for key, question in self._questions.items() if question.deadline <= now]:
            self._questions.pop(key).on_answer(None)

    # -- admission and run ends (main thread, from SignalAwareRequest) ---------------------
    def hold(self, request: Request) -> bool:
        """Whether the worker must hold ``request`` back instead of handing it to the pool.

        The first time the worker hands it over, the node asks its thread whether a cancel
        waits for the task and holds it back (with an event loop; without one it waits for
        the answer). On the answer the task is either skipped (Celery's revoke, with the
        reason ``cancelled (skipped)``) or handed to the pool again, and then let through.
        """
        admitted = request._tasksignal_admitted
        if admitted is not None:
            return not admitted
        task_id = request.id
        if request not in worker_state.reserved_requests:
            # Celery's strategy looks at a message with an expiry before reserving it:
            # the node decides when the worker hands it to the pool, not at that look.
            return False
        if ("admit", task_id) in self._questions:
            return True
        index = None
        try:
            index = self.board.allocate(task_id)
        except (boards.BoardFull, ValueError) as exc:
            logger.error("task %s has no mailbox (%s): it cannot be signalled", task_id, exc)
        task = request.task
        grace, kill_after = task.resolved_cancel_grace(), task.resolved_kill_after()
        answer: concurrent.futures.Future[Any] = concurrent.futures.Future()
        ancestors = lineage.ancestors_of(request)
        self._push("admit", task_id, answer, request.name, index, grace, kill_after, ancestors)
        if self._hub is None:
            return not self._admit(request, index, _result(answer))

        def admitted_or_not(verdict: bool | None) -> None:
            if self._admit(request, index, verdict):
                try:
                    self.worker.process_task(request)  # to the pool, as Celery first tried
                except Exception:
                    logger.exception("could not hand task %s to the pool", task_id)

        self._when_answered(("admit", task_id), answer, admitted_or_not)
        return True

    def _admit(self, request: Request, index: int | None, verdict: bool | None) -> bool:
        """Act on the thread's verdict on ``request``: follow it, or skip it (and say so)."""
        task_id = request.id
        request._tasksignal_admitted = verdict is not False
        if verdict is False:
            if index is not None:
                self.board.free(index, task_id)
            # Celery's own announcement of a revoked task, with our reason.
            request.announce_cancelled("cancelled (skipped)")
            return False
        if verdict is None:
            logger.warning("could not look up signals of %s in time; it runs unchecked", task_id)
        self._admitted[task_id] = Admission(request, index)
        return True

    def run_stopped(
        self, request: Request, stopped: RunStopped, announce: Callable[[], None]
    ) -> None:
        """A run ended by a cancel (:class:`~tasksignal.exceptions.RunStopped`): call
        ``announce()`` (Celery's revoke, which acknowledges the message) once the cancel's
        outcome is written, or after ``ANSWER_TIMEOUT``.

        The node's thread usually has written it already: the run woke it as it ended.
        """
        task_id = request.id
        waiter = self._stop_waiters[task_id] = concurrent.futures.Future()
        self._push("stopped", task_id, stopped.outcome)

        def written(ok: object) -> None:
            self._stop_waiters.pop(task_id, None)
            if not ok:
                logger.warning("the outcome of %s is not written yet; it will be", task_id)
            self._end(task_id, RunState.CANCELLED)
            announce()

        if task_id in self._stops_written:
            written(True)
        elif self._hub is None:
            written(_result(waiter))
        else:
            self._when_answered(("stopped", task_id), waiter, written)

    def escalate_now(self, task_id: str) -> None:
        """Any thread: take ``task_id``'s cancel straight to the kill, without waiting for
        ``cancel_grace`` or ``kill_after`` (Celery's ``revoke(terminate=True)``,
        ``control.py``); the kill still proves the process runs this task first."""
        self._push("escalate_now", task_id)

    def settle_never_sent(self, task_id: str, never_sent: list[str]) -> None:
        """Main thread: ``task_id`` was cancelled before it could send ``never_sent`` (the
        rest of its chain, its chord's body), which are stored ``REVOKED``: their pending
        cancels (a cascade wrote them) are completed ``skipped``, for they never run."""
        self._push("never_sent", task_id, never_sent, urgent=False)

    def run_failed(self, request: Request, error: str) -> None:
        """A run ended with an exception (or was killed: then it is already recorded)."""
        admission = self._admitted.get(request.id)
        if admission is not None and not admission.killed:
            self._end(request.id, RunState.FAILED, error[:1000])

    def observe(self, request: Request) -> None:
        """Follow a task that is not signal-aware but has a run record (the API started it),
        so that its record does not stay ``queued``."""
        self._observed[request.id] = Observed(request)

    def main_tick(self) -> None:
        """Main thread, every ``MAIN_TICK``: runs that ended, answers overdue, kills to do."""
        self._watch_answers()
        self._expire_questions(time.monotonic())
        for task_id, admission in list(self._admitted.items()):
            # Celery drops a request from its reserved and active sets when it ends (a
            # failure or a stop came through on_failure first, so this run succeeded); a
            # broker reconnection empties only the reserved set (see _ended).
            if _ended(admission.request):
                self._end(task_id, RunState.SUCCEEDED)
        for task_id, observed in list(self._observed.items()):
            request = observed.request
            if request.time_start is not None and not observed.started:
                observed.started = True
                started = request.time_start
                self._push(
                    "observed", task_id, request.name, request.worker_pid, started, None,
                    urgent=False,
                )  # fmt: skip
            if _ended(request):
                del self._observed[task_id]
                backend = request.task.backend
                self._push("observed", task_id, request.name, None, None, backend, urgent=False)
        while self._kills:
            self._kill(self._kills.popleft())

    def _end(self, task_id: str, state: str, error: str = "") -> None:
        admission = self._admitted.pop(task_id, None)
        self._stops_written.discard(task_id)
        if admission is None:
            return
        if admission.index is not None:
            self.board.free(admission.index, task_id)
        self._push("ended", task_id, admission.request.name, state, error, urgent=False)

    def _kill(self, task_id: str) -> None:
        admission = self._admitted.get(task_id)
        if admission is None or admission.index is None:
            return  # it ended meanwhile
        request = admission.request
        pid = request.worker_pid
        if not pid or pid == os.getpid():
            return  # not started in a pool process yet (the node asks again), or in-process

        def kill() -> None:
            # While the process is frozen: the outcome is written before Celery acks.
            self._ask("complete_kill", task_id)
            request.terminate(self.worker.pool, "SIGKILL")

        if not kill_if_running(pid, lambda: self.board.runs(admission.index, task_id, pid), kill):
            return
        admission.killed = True
        run = self.board.read_run(admission.index, task_id)  # the dead process's last word
        logger.warning("killed pid %s to stop cancelled task %s", pid, task_id)
        self._end(task_id, RunState.CANCELLED)
        if run is not None and run.backend_pid:
            # The killed process's query would otherwise run on until it finished.
            self._push("terminate_backend", task_id, run.backend_pid, urgent=False)

    # -- the node's thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            try:
                self._step(time.monotonic())
                if stopping:
                    self._flush_records()
                    break
                self._wait(self._next_wakeup(time.monotonic()))
            except DATABASE_ERRORS as exc:
                logger.warning("tasksignal node lost PostgreSQL (%s); reconnecting", exc)
                self._outage = True
                self._disconnect()
                if stopping:
                    break
            except Exception:
                logger.exception("tasksignal node error; carrying on")
                if stopping:
                    break
                time.sleep(0.2)
        self._disconnect()

    def _step(self, now: float) -> None:
        if self._db is None and now >= self._reconnect_at:
            self._connect()
        # Before anything that may fail: the main thread may be waiting for an answer.
        self._take_events()
        if self._db is not None and not self._records_checked and now >= self._next["recover"]:
            self._recover_orphans(now)
        if self._db is not None and self._lost_candidates and now >= self._next["lost"]:
            self._find_lost_messages(now)
        if self._db is not None and self._maybe_notified:
            self._take_notifications()
        # Periodic work due soon is done now, while the thread is awake anyway.
        soon = now + EARLY
        if soon >= self._next["poll"]:
            self._next["poll"] = now + boards.POLL_INTERVAL
            self._poll_mailboxes(list(self._tracked.values()))
        elif self._woken:
            woken, self._woken = self._woken, set()
            self._poll_mailboxes([t for t in self._tracked.values() if t.index in woken])
        # Stopping a run needs no database: through an outage its cancel still escalates on
        # time (a task that ended meanwhile would have made the cancel too_late); what the
        # runs report is written once the node is back.
        self._escalate(now)
        if self._db is None:
            return
        if (self._to_unlisten or self._unlisten_later) and now >= self._next["unlisten"]:
            self._next["unlisten"] = now + UNLISTEN_INTERVAL
            if self._to_unlisten:
                self._execute("; ".join(self._unlisten_statements()))
            self._to_unlisten, self._unlisten_later = self._unlisten_later, set()
        if self._tracked and soon >= self._next["reconcile"]:
            self._next["reconcile"] = now + self.reconcile_interval
            self._deliver_rows(self._execute(sql.pending_signals_of(), [list(self._tracked)]))
        if self._completions:
            self._write_completions()
        if soon >= self._next["flush"] and (self._records or self._ended):
            self._next["flush"] = now + RECORD_FLUSH_INTERVAL
            self._flush_records()
        if self._maybe_notified:
            self._take_notifications()  # those that came with the answers above
        if now >= self._next["snapshot"]:
            self._next["snapshot"] = now + SNAPSHOT_INTERVAL
            self._take_snapshot()

    def _next_wakeup(self, now: float) -> float:
        deadlines = [now + 3600.0]
        if self._db is None:
            deadlines.append(self._reconnect_at)
        elif not self._records_checked:
            deadlines.append(self._next["recover"])
        elif self._lost_candidates:
            deadlines.append(self._next["lost"])
        if self._tracked:
            deadlines += [self._next["reconcile"], self._next["poll"]]
        if self._records or self._ended:
            deadlines.append(self._next["flush"])
        if self._to_unlisten or self._unlisten_later:
            deadlines.append(self._next["unlisten"])
        for tracked in self._tracked.values():
            deadlines += [d for d in (tracked.interrupt_at, tracked.kill_at) if d is not None]
        return max(0.0, min(deadlines) - now)

    def _wait(self, timeout: float) -> None:
        readers = [self._wake_read] if self._db is None else [self._wake_read, self._db_fd]
        self._sleep_until = time.monotonic() + timeout
        self._sleeping = True
        try:
            if not self._events.empty():
                return
            ready, _, _ = select.select(readers, [], [], timeout)
        finally:
            self._sleeping = False
        if self._wake_read in ready:
            self._read_wake_ups()
        if self._db_fd in ready:
            self._maybe_notified = True

    def _read_wake_ups(self) -> None:
        try:
            data = os.read(self._wake_read, 4096 * 4)
        except BlockingIOError:
            return
        for (index,) in struct.iter_unpack("<i", data[: len(data) - len(data) % 4]):
            if index >= 0:
                self._woken.add(index)

    def _connect(self) -> None:
        params = connections["default"].get_connection_params()
        # Django's cursor class and adapters are for the ORM; the node speaks plain psycopg
        # (and Django's adapters map makes each of its statements cost three times the CPU).
        params.pop("cursor_factory", None)
        params.pop("context", None)
        if "prepare_threshold" not in connections["default"].settings_dict["OPTIONS"]:
            # Django turns psycopg's prepared statements off unless OPTIONS asks (a pgbouncer
            # in transaction mode cannot keep them); the node prepares its admission, which
            # runs once a task, unless your OPTIONS say otherwise.
            params.pop("prepare_threshold", None)
        try:
            self._db = psycopg.connect(
                **params, autocommit=True, application_name=self._application
            )
        except DATABASE_ERRORS as exc:
            self._reconnect_at = time.monotonic() + RECONNECT_DELAY
            if not self._outage:
                logger.warning("tasksignal node cannot reach PostgreSQL (%s); retrying", exc)
            self._outage = True
            return
        if self._outage:
            logger.warning("tasksignal node reconnected to PostgreSQL")
        self._outage = False
        self._db_fd = self._db.fileno()
        # A new session listens to nothing and may have missed notifications.
        self._to_unlisten.clear()
        self._unlisten_later.clear()
        self._listening = set(self._tracked)
        if self._tracked:
            self._execute("; ".join(f"LISTEN {self._channel(t)}" for t in self._tracked))
        self._next["reconcile"] = 0.0

    def _recover_orphans(self, now: float) -> None:
        """Once per node, first thing: settle what an earlier life of this node (or any
        node that died) left behind, and give the messages of runs that must run again
        back to the queue at once rather than after the visibility timeout.

        1. Runs this node's name left ``running``: :func:`sql.recover_orphans` (once:
           later, this node's own runs are recorded under the same name).
        2. Unfinished run records whose task the result backend knows is over (the node
           died before it wrote their end): ended with Celery's state (the backend may be
           down too: then again after ``RECONNECT_DELAY``).
        3. The messages of the orphans requeued in 1, and of queued runs with a pending
           cancel (a dead node held them unstarted; restoring one a live worker holds is
           harmless: whichever copy comes first is skipped, and the other then too).
        4. Then, queued runs whose message the broker lost: :meth:`_find_lost_messages`.
        """
        if not self._orphans_settled:
            ((requeued, killed, _, _),) = self._execute(
                sql.recover_orphans(),
                {
                    "worker": self.hostname,
                    "application": self._application,
                    "done_channel": self.done_channel,
                },
            )
            self._orphans_settled = True
            self._requeued = set(requeued or [])
            if self._requeued or killed:
                logger.warning(
                    "tasksignal node %s found %d runs of its earlier life: %d cancels "
                    "completed killed, %d back to queued",
                    self.hostname, len(self._requeued) + killed, killed, len(self._requeued),
                )  # fmt: skip
        unfinished = self._execute(sql.unfinished_runs(), {"limit": RECOVERY_LIMIT})
        app = self.worker.app
        try:
            ended = results.ended_states(app.backend, [task_id for task_id, *_ in unfinished])
        except Exception as exc:  # the result backend is away: all of step 2 and 3 again
            self._recover_later(now, exc)
            return
        if ended:
            parameters = {"task_ids": list(ended), "states": list(ended.values())}
            self._execute(
                sql.settle_ended_runs(), {**parameters, "done_channel": self.done_channel}
            )
        waiting = {task_id for task_id, _state, cancel, *_ in unfinished if cancel}
        try:
            restored = broker.restore_unacknowledged(app, (self._requeued | waiting) - set(ended))
        except Exception as exc:  # the broker is away
            self._recover_later(now, exc)
            return
        self._records_checked = True
        self._lost_candidates = {
            task_id: name
            for task_id, state, _cancel, name, age in unfinished
            if state == RunState.QUEUED and age >= LOST_AFTER and task_id not in ended
        }
        self._next["lost"] = now
        if ended or restored:
            logger.warning(
                "tasksignal node %s: %d run records ended from their results, %d messages "
                "given back to the queue",
                self.hostname, len(ended), restored,
            )  # fmt: skip

    def _find_lost_messages(self, now: float) -> None:
        """After recovery: send again the queued runs whose message Redis lost, and settle
        those among them with a pending cancel (:func:`sql.settle_lost_runs`).

        A node killed while a message was on its way to it (``BRPOP`` answered, the answer
        not read yet) takes the only copy with it; so does a web process that died between
        committing a run's record and publishing its message. A message in no queue and
        not delivered, in two looks a second apart (one on its way to a live worker lands
        in between), is lost. Only runs recorded by ``start_recorded`` (the API, the admin)
        are ``queued``, with their name and arguments: they can be sent again faithfully.
        """
        app = self.worker.app
        queues = {
            app.amqp.router.route({}, name)["queue"].name for name in self._lost_candidates.values()
        }
        try:
            held = broker.held_messages(app, queues)
        except Exception as exc:  # the broker is away
            self._next["lost"] = now + RECONNECT_DELAY
            logger.warning("tasksignal node cannot look for lost messages yet (%s)", exc)
            return
        if held is None:  # not Redis, or too much to read through
            self._lost_candidates = {}
            return
        missing = {
            task_id: name for task_id, name in self._lost_candidates.items() if task_id not in held
        }
        if not self._lost_looked_once:
            self._lost_candidates, self._lost_looked_once = missing, True
            self._next["lost"] = now + LOST_RECHECK
            return
        lost = list(missing)
        self._lost_candidates, self._lost_looked_once = {}, False
        if not lost:
            return
        ((resend, skipped, _, _),) = self._execute(
            sql.settle_lost_runs(), {"task_ids": lost, "done_channel": self.done_channel}
        )
        for task_id, name, kwargs in resend or []:
            app.send_task(
                name, kwargs=kwargs or {}, task_id=task_id, headers={RECORDED_HEADER: True}
            )
        logger.warning(
            "tasksignal node %s: %d queued runs had lost their message: %d sent again, "
            "%d cancelled ones settled skipped",
            self.hostname, len(lost), len(resend or []), skipped,
        )  # fmt: skip

    def _recover_later(self, now: float, error: Exception) -> None:
        self._next["recover"] = now + RECONNECT_DELAY
        logger.warning("tasksignal node cannot check its runs' results yet (%s)", error)

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        self._reconnect_at = time.monotonic() + RECONNECT_DELAY
        if db is not None:
            with contextlib.suppress(*DATABASE_ERRORS):
                db.close()

    def _execute(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run ``statement`` on the node's connection; return the rows of its last result."""
        cursor = self._db.execute(statement, params)
        self._maybe_notified = True  # the server may have sent some with its answer
        rows: list[tuple[Any, ...]] = []
        while True:
            if cursor.description is not None:
                rows = cursor.fetchall()
            if not cursor.nextset():
                return rows

    def _execute_prepared(
        self, commands: list[str], statement: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Run ``commands`` (``LISTEN``, ``UNLISTEN``: they take no parameters), then
        ``statement`` as a prepared statement, in one pipeline: one round trip. Returns the
        statement's rows."""
        with self._db.pipeline():
            for command in commands:
                self._db.execute(command)
            cursor = self._db.execute(statement, params, prepare=True)
        self._maybe_notified = True  # the server may have sent some with its answers
        return cursor.fetchall()

    @staticmethod
    def _channel(task_id: str) -> str:
        return f'"{notify.signal_channel(task_id)}"'  # a hash in hex: nothing to escape

    def _unlisten_statements(self) -> list[str]:
        statements = [f"UNLISTEN {self._channel(task_id)}" for task_id in self._to_unlisten]
        self._listening -= self._to_unlisten
        self._to_unlisten = set()
        return statements

    def _take_snapshot(self) -> None:
        self.snapshot = {
            "connected": self._db is not None,
            "tasks": {
                task_id: {
                    "pid": tracked.pid,
                    "listening": task_id in self._listening,
                    "pending_signals": sorted(tracked.signals),
                    "cancelled": tracked.cancel is not None,
                }
                for task_id, tracked in self._tracked.items()
            },
        }

    # -- events from the main thread ---------------------------------------------------
    def _take_events(self) -> None:
        while not self._events.empty():
            kind, task_id, *details = self._events.get_nowait()
            handle = getattr(self, f"_on_{kind}")
            if not details or not isinstance(details[0], concurrent.futures.Future):
                handle(task_id, *details)
                continue
            answer, details = details[0], details[1:]
            try:
                answer.set_result(handle(task_id, *details))
            except DATABASE_ERRORS as exc:
                answer.set_exception(exc)
                raise  # the node reconnects; the events still queued wait for it

    def _on_admit(
        self,
        task_id: str,
        task_name: str,
        index: int,
        cancel_grace: float,
        kill_after: float,
        ancestors: list[str],
    ) -> bool | None:
        """``LISTEN`` for the task and read its signals (completing a cancel ``skipped``, or
        inheriting an ancestor's cascade cancel), in one round trip; follow the task unless
        it was cancelled. Answers whether it may run."""
        tracked = Tracked(task_id, task_name, index, cancel_grace, kill_after)
        self._tracked[task_id] = tracked
        if self._db is None:
            return None  # unchecked: followed, listened to and reconciled on reconnect
        commands = [f"LISTEN {self._channel(task_id)}", *self._unlisten_statements()]
        params = {"task_id": task_id, "ancestors": ancestors, "done_channel": self.done_channel}
        rows = self._execute_prepared(commands, sql.admit_task(), params)
        self._listening.add(task_id)
        if any(kind == CANCEL_TASK for _, kind, _, _, _ in rows):
            del self._tracked[task_id]
            self._to_unlisten.add(task_id)
            self._ended.append(task_id)
            now = datetime.datetime.now(datetime.UTC)
            self._record(tracked, state=RunState.CANCELLED, finished_at=now, error="")
            return False
        self._deliver_rows([(row[0], task_id, row[1], row[2], row[4]) for row in rows])
        return True

    def _on_complete_kill(self, task_id: str) -> None:
        self._stop(task_id, Outcome.KILLED, self._tracked.get(task_id))
        if self._db is not None:
            self._write_completions()

    def _on_escalate_now(self, task_id: str) -> None:
        tracked = self._tracked.get(task_id)
        if tracked is None:
            return  # over, or skipped at admission
        tracked.kill_after = 0.0  # a cancel delivered later is scheduled for a kill at once
        if tracked.kill_at is not None:
            tracked.kill_at = time.monotonic()

    def _on_never_sent(self, _task_id: str, never_sent: list[str]) -> None:
        for task_id in never_sent:
            self._complete("cancels", Outcome.SKIPPED, task_id)

    def _on_terminate_backend(self, task_id: str, backend_pid: int) -> None:
        if self._db is not None:
            self._execute("SELECT pg_terminate_backend(%s)", [backend_pid])

    def _on_stopped(self, task_id: str, outcome: str) -> None:
        tracked = self._tracked.get(task_id)
        if tracked is not None:
            self._poll_mailbox(tracked)  # its own report, if it made one
        if tracked is None or not tracked.stop_recorded:
            self._stop(task_id, outcome, tracked)

    def _on_ended(self, task_id: str, task_name: str, state: str, error: str) -> None:
        tracked = self._tracked.pop(task_id, None) or Tracked(task_id, task_name, None)
        if task_id in self._listening:
            self._unlisten_later.add(task_id)
        self._ended.append(task_id)
        now = datetime.datetime.now(datetime.UTC)
        self._record(tracked, state=state, finished_at=now, error=error)

    def _on_observed(
        self,
        task_id: str,
        task_name: str,
        pid: int | None,
        started: float | None,
        backend: Any,
    ) -> None:
        tracked = Tracked(task_id, task_name, None)
        if backend is None:  # it started
            started_at = datetime.datetime.fromtimestamp(started, datetime.UTC)
            self._record(tracked, state=RunState.RUNNING, started_at=started_at, pid=pid)
            return
        # Celery alone knows how a plain task ended; its result backend tells.
        state = RunState.OF_CELERY_STATE.get(backend.get_state(task_id), RunState.FAILED)
        now = datetime.datetime.now(datetime.UTC)
        self._record(tracked, state=state, finished_at=now)
        self._ended.append(task_id)

    # -- delivery -------------------------------------------------------------------------
    def _take_notifications(self) -> None:
        self._maybe_notified = False
        for notice in list(self._db.notifies(timeout=0)):
            self.notices += 1
            try:
                payload = notify.decode(notice.payload)
            except ValueError:
                logger.warning("ignoring a notification on %s: %r", notice.channel, notice.payload)
                continue
            tracked = self._tracked.get(payload["task_id"])
            if tracked is not None:
                payload["age"] = 0.0
                self._deliver(tracked, payload)
            elif payload["task_id"] in self._listening:  # it ended a moment ago
                self._ended.append(payload["task_id"])  # the next write settles it too_late

    def _deliver_rows(self, rows: list[tuple[Any, ...]]) -> None:
        for row_id, task_id, kind, message, age in rows:
            tracked = self._tracked.get(task_id)
            if tracked is not None:
                payload = {"id": row_id, "signal": kind, "message": message, "age": age}
                self._deliver(tracked, payload)

    def _deliver(self, tracked: Tracked, payload: dict[str, Any]) -> None:
        """Give ``tracked``'s run a signal, once: post its whole pending list again."""
        if payload["id"] in tracked.signals:
            return
        tracked.signals[payload["id"]] = payload
        if tracked.index is not None:
            signals = [_posted(p) for p in tracked.signals.values()]
            self.board.post(tracked.index, tracked.task_id, signals)
        if payload["signal"] == CANCEL_TASK and tracked.cancel is None:
            now = time.monotonic()
            tracked.cancel = payload
            tracked.cancel_created = now - max(0.0, payload.get("age") or 0.0)
            if tracked.started is not None:
                self._schedule_escalation(tracked, now)

    def _schedule_escalation(self, tracked: Tracked, now: float) -> None:
        # The grace counts from when the run could first see the cancel; kill_after from
        # the later of the cancel and the start (its age is the database's), so a task
        # cancelled while queued is never killed for the time it waited.
        tracked.interrupt_at = now + tracked.cancel_grace
        if tracked.pid != self.pid:  # solo and threads pools: a kill would end the worker
            tracked.kill_at = max(tracked.cancel_created, tracked.started) + tracked.kill_after

    # -- mailboxes ------------------------------------------------------------------------
    def _poll_mailboxes(self, runs: list[Tracked]) -> None:
        for tracked in runs:
            self._poll_mailbox(tracked)

    def _poll_mailbox(self, tracked: Tracked) -> None:
        if tracked.index is None:
            return
        run = self.board.read_run(tracked.index, tracked.task_id)
        if run is None or run.seq == tracked.run_seq:
            return
        tracked.run_seq = run.seq
        if tracked.started is None and run.run_state != boards.WAITING:
            self._on_run_began(tracked, run)
        if run.acks_written:
            for ack in self.board.take_acks(tracked.index, tracked.task_id):
                tracked.signals.pop(ack.signal_id, None)
                self._complete("ids", ack.outcome, ack.signal_id, ack.error[:255])
        if run.run_state == boards.PAUSED and tracked.run_state != boards.PAUSED:
            self._record(tracked, state=RunState.PAUSED)
        elif run.run_state == boards.RUNNING and tracked.run_state == boards.PAUSED:
            self._record(tracked, state=RunState.RUNNING)
        tracked.run_state = run.run_state
        if run.stop_outcome and not tracked.stop_recorded:
            self._stop(tracked.task_id, run.stop_outcome, tracked)
        progress = (run.progress_current, run.progress_total, run.progress_message)
        if run.progress_current is not None and progress != tracked.progress:
            tracked.progress = progress
            self._record(
                tracked,
                progress_current=run.progress_current,
                progress_total=run.progress_total,
                progress_message=run.progress_message,
            )

    def _on_run_began(self, tracked: Tracked, run: boards.RunReport) -> None:
        now = time.monotonic()
        tracked.pid = run.pid
        tracked.started = now - max(0.0, time.time() - run.started)
        if tracked.cancel is not None:
            self._schedule_escalation(tracked, now)
        started_at = datetime.datetime.fromtimestamp(run.started, datetime.UTC)
        self._record(tracked, state=RunState.RUNNING, started_at=started_at, pid=run.pid)

    def _stop(self, task_id: str, outcome: str, tracked: Tracked | None) -> None:
        """Complete ``task_id``'s cancel with the rung that stopped it (written this step)."""
        if tracked is not None:
            tracked.stop_recorded = True
            tracked.interrupt_at = tracked.kill_at = None
        self._complete("cancels", outcome, task_id)

    def _escalate(self, now: float) -> None:
        for tracked in self._tracked.values():
            if tracked.interrupt_at is not None and now >= tracked.interrupt_at:
                # Again every grace period: task code may swallow one with a bare except.
                tracked.interrupt_at = now + max(tracked.cancel_grace, 0.05)
                self._interrupt(tracked)
            if tracked.kill_at is not None and now >= tracked.kill_at:
                tracked.kill_at = now + KILL_RETRY  # until the main thread managed it
                self._kills.append(tracked.task_id)

    def _interrupt(self, tracked: Tracked) -> None:
        if tracked.index is None or not self.board.runs(
            tracked.index, tracked.task_id, tracked.pid
        ):
            return  # not begun yet, or over
        self.board.request_interrupt(tracked.index, tracked.task_id)
        if tracked.pid != self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(tracked.pid, INTERRUPT_SIGNAL)
            return
        run = self.board.read_run(tracked.index, tracked.task_id)
        if run is None:
            return
        if run.thread_ident == threading.main_thread().ident:
            signal.pthread_kill(run.thread_ident, INTERRUPT_SIGNAL)  # solo pool
        else:
            # Threads pool: only the main thread runs signal handlers, so use an async
            # exception instead; it lands when the thread next runs Python bytecode.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(run.thread_ident), ctypes.py_object(_task_cancelled())
            )

    # -- writing ----------------------------------------------------------------------------
    def _complete(self, by: str, outcome: str, key: object, error: str = "") -> None:
        """Queue a completion: signal rows by ``ids``, or the pending ``cancels`` of tasks."""
        self._completions.setdefault((by, outcome, error), []).append(key)

    def _write_completions(self) -> None:
        completions, self._completions = self._completions, {}
        try:
            for (by, outcome, error), keys in completions.items():
                statement = sql.complete_signals() if by == "ids" else sql.complete_cancels_of()
                parameters = {"outcome": outcome, "error": error, "keys": keys}
                self._execute(statement, {**parameters, "done_channel": self.done_channel})
        except DATABASE_ERRORS:
            for key, keys in completions.items():  # retried after the reconnect
                self._completions.setdefault(key, []).extend(keys)
            raise
        for (by, _outcome, _error), keys in completions.items():
            if by == "cancels":
                for task_id in keys:
                    self._stops_written.add(task_id)
                    waiter = self._stop_waiters.get(task_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(True)

    def _record(self, tracked: Tracked, **fields: object) -> None:
        if not self.record_runs:
            return
        entry = self._records.get(tracked.task_id)
        if entry is None:
            entry = self._records[tracked.task_id] = {
                "task_name": tracked.task_name,
                "worker": self.hostname,
            }
        entry.update(fields)

    def _flush_records(self) -> None:
        if self._db is None:
            return
        records, self._records = self._records, {}
        ended, self._ended = self._ended, []
        try:
            parameters = records_parameters(records, ended)
            self._execute(sql.write_runs(), {**parameters, "done_channel": self.done_channel})
        except DATABASE_ERRORS:
            for task_id, values in records.items():
                self._records[task_id] = {**values, **self._records.get(task_id, {})}
            self._ended[:0] = ended
            raise


def records_parameters(
    records: dict[str, dict[str, Any]], ended: list[str]
) -> dict[str, list[Any]]:
    """The parameters of ``sql.write_runs()`` for ``records`` (``{task_id: fields}``) and the
    task ids of the runs that ended.

    A run that started and succeeded since the last write was never visible as running:
    creating a row for it is the expensive part of recording (a row and its index entries
    per task), so it only updates a row that exists (such as the ``queued`` row the API
    creates). Every other record is created if missing.

    >>> params = records_parameters({"a": {"state": "running"}}, ["b"])
    >>> params["task_id"], params["new_task_id"], params["state"], params["ended"]
    (['a'], ['a'], ['running'], ['b'])
    """
    parameters: dict[str, list[Any]] = {"ended": ended}
    for name in sql.RUN_COLUMNS:
        parameters[name], parameters[f"new_{name}"] = [], []
    for task_id, values in records.items():
        row = {"task_id": task_id, **values}
        brief = "started_at" in values and values.get("state") == RunState.SUCCEEDED
        for name in sql.RUN_COLUMNS:
            parameters[name].append(row.get(name))
            if not brief:
                parameters[f"new_{name}"].append(row.get(name))
    return parameters


def _ended(request: Request) -> bool:
    """Whether Celery is done with ``request``: it is neither reserved nor active, and it
    started or was acknowledged.

    Celery's own end of a request (``task_ready``) drops it from both sets. A broker
    reconnection empties the reserved set of the requests that were not active yet: those
    that had not started (they will run or come back), and also one whose pool process
    had begun it but whose acceptance the worker had not read yet; that one becomes active
    afterwards, outside the reserved set, and is still running.

    >>> from types import SimpleNamespace
    >>> from celery.worker.consumer import Consumer
    >>> class Request:  # what this function and Celery's worker state read of one
    ...     id, name, time_start, acknowledged = "a-task-id", "a.task", None, False
    >>> request = Request()
    >>> worker_state.task_reserved(request)
    >>> Consumer.on_close(SimpleNamespace(controller=None, task_buckets={}, timer=None, pool=None))
    >>> worker_state.task_accepted(request); request.time_start = 1.0
    >>> _ended(request)
    False
    >>> worker_state.task_ready(request)
    >>> _ended(request)
    True
    """
    if request in worker_state.reserved_requests or request in worker_state.active_requests:
        return False
    return request.time_start is not None or request.acknowledged


def _nonblocking_pipe() -> tuple[int, int]:
    read, write = os.pipe()
    for fd in (read, write):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return read, write


def _result(answer: concurrent.futures.Future[Any]) -> Any:
    """Wait for the node thread's answer, ``ANSWER_TIMEOUT`` at most; ``None`` without."""
    try:
        return answer.result(ANSWER_TIMEOUT)
    except (concurrent.futures.TimeoutError, *DATABASE_ERRORS):
        return None


def _posted(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a signal a run needs (not the node's bookkeeping)."""
    return {key: value for key, value in payload.items() if key != "age"}


def _task_cancelled() -> type:
    from tasksignal.exceptions import TaskCancelled

    return TaskCancelled


@task_received.connect
def _observe_recorded(request: Any = None, **kwargs: object) -> None:
    """A task that is not signal-aware but whose run the producer recorded: follow it."""
    node = current()
    signal_aware = hasattr(request, "_tasksignal_admitted")  # a SignalAwareRequest
    if node is not None and not signal_aware and request.request_dict.get(RECORDED_HEADER):
        node.observe(request)


@inspect_command()
def tasksignal(state: Any, **kwargs: object) -> dict[str, Any]:
    """What this node's signalling runtime holds: its tasks, their pending signals, whether
    it listens for them, and how many notices reached it (``celery inspect tasksignal``)."""
    node = current()
    if node is None:
        return {"error": "no tasksignal node here"}
    return {**node.snapshot, "notices": node.notices}


def _capacity(worker: Any) -> int:
    prefetch = worker.app.conf.worker_prefetch_multiplier or 1
    return MAILBOXES_PER_SLOT * max(16, (worker.concurrency or 1) * max(prefetch, 1))


class NodeStep(bootsteps.StartStopStep):
    """Worker bootstep that runs the node: add it with ``app.steps["worker"].add(NodeStep)``.

    Its board is made when the step is created, before the pool starts its processes, so
    that they inherit where it is. It runs just before the pool: started before it, stopped
    after it, so that a warm shutdown, which waits for the running tasks, still records how
    each of them ended.
    """

    requires: Any = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.node = Node(worker.hostname, _capacity(worker))
        from tasksignal import control  # it imports this module

        control.install()  # Celery's revoke and terminate commands through the node
        self.tref: Any = None

    def include(self, parent: Any) -> bool:
        """Take this step's place just before the pool in the worker's start order."""
        included: bool = super().include(parent)
        if included:
            parent.steps.remove(self)
            at = next(i for i, step in enumerate(parent.steps) if isinstance(step, Pool))
            parent.steps.insert(at, self)
        return included

    def start(self, worker: Any) -> None:
        """Start the node's thread and the main thread's tick."""
        guard_redis_transport()
        self.node.start(worker)
        self.tref = worker.timer.call_repeatedly(MAIN_TICK, self.node.main_tick)

    def stop(self, worker: Any) -> None:
        """After the pool stopped: note the last runs' ends, then stop the node."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        self.node.main_tick()
        self.node.stop()
