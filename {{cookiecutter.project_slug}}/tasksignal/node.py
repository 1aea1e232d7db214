"""The worker node's side of signalling: one runtime per ``celery worker``, in its main process.

A worker node is one ``celery worker`` command: a main process and its pool. The node
runtime lives in the main process, which already knows which pool process runs which
request, so the cost of signalling follows the number of signals, not of processes:

* **Admission** (main thread, from ``SignalAwareRequest.revoked()``): before Celery hands a
  task to the pool, one indexed query tells whether a cancel is waiting for it; if so the
  task is skipped and no pool process sees it. Otherwise the run gets a mailbox on the
  node's board (``board.py``), with any signal already pending in it.
* **Listening** (the node's thread): ``LISTEN`` on the channel of each task the node holds
  (``notify.py``), so a signal reaches this node the moment its row commits, and only if the
  node holds the task. Every ``TASKSIGNAL_RECONCILE_INTERVAL`` one query reads the pending
  signals of the node's tasks (not of the whole table), covering reconnects.
* **Delivery**: the node posts a run's signals into its mailbox; the run sees them at its
  next ``checkpoint()`` (a memory read) and reports what it handled back through it.
* **Escalation**: ``cancel_grace`` after the node delivered a cancel, it asks the run to
  interrupt itself (``SIGUSR2``, or an asynchronous exception in a pool thread); at
  ``kill_after`` the main thread kills the process in isolation (``kill.py``).
* **Records and outcomes**: the node's thread writes ``TaskRun`` records and the outcomes
  of pause, resume and registered kinds in batches; the outcome of a stop (skipped,
  cooperative, interrupted, killed) is written by the main thread as it handles that run's
  end, before Celery acknowledges the message.

The node holds two PostgreSQL connections whatever its concurrency: the main thread's
(admission, stops) and its thread's (listening, reconcile, records). Pool processes hold
none for signalling. Add it to the Celery app (``config/celery.py`` does)::

    app.steps["worker"].add(NodeStep)
"""

from __future__ import annotations

import collections
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
from dataclasses import dataclass, field

from celery import bootsteps
from celery.signals import task_received
from celery.worker import state as worker_state
from celery.worker.components import Pool
from celery.worker.control import inspect_command
from django.db import DatabaseError, connection, connections
from django.db.models.functions import Coalesce, Now

from tasksignal import board as boards
from tasksignal import conf, notify, sql
from tasksignal.kill import kill_if_running
from tasksignal.registry import CANCEL_TASK
from tasksignal.runtime import BOARD_VARIABLE, INTERRUPT_SIGNAL
from tasksignal.states import RECORDED_HEADER, Outcome, RunState

logger = logging.getLogger(__name__)

#: Seconds between two writes of run records.
RECORD_FLUSH_INTERVAL = 0.25
#: Seconds between two looks at the mailboxes of running tasks (progress, acks, pauses).
MAILBOX_POLL_INTERVAL = 0.05
#: Seconds between two looks of the main thread at ended runs and kills to do.
MAIN_TICK = 0.05
#: Seconds before trying again a kill that could not be done yet (the run not started).
KILL_RETRY = 0.1
#: Seconds to wait before reconnecting to PostgreSQL after an error.
RECONNECT_DELAY = 0.5
#: Mailboxes per task the pool can hold at once (the board's load factor).
MAILBOXES_PER_SLOT = 4
#: Seconds the main thread waits for a stopped run's outcome to be written before it lets
#: Celery acknowledge the message anyway (the node keeps retrying the write).
STOP_WRITE_TIMEOUT = 1.0
#: What the main thread writes on the wake-up pipe (runs write their mailbox index).
WAKE_FOR_EVENTS = struct.pack("<i", -1)

_current: Node | None = None


def current() -> Node | None:
    """The node of this worker process, or ``None`` (not a worker, or no ``NodeStep``)."""
    return _current


@dataclass
class Admission:
    """A request the main thread handed to the pool (main thread only)."""

    request: object
    index: int | None
    killed: bool = False


@dataclass
class Observed:
    """A task that is not signal-aware, with a run record to keep (main thread only)."""

    request: object
    started: bool = False


@dataclass(frozen=True)
class Completion:
    """Signals to complete: a task's pending cancel (``task_id``), or rows by ``ids``."""

    outcome: str
    task_id: str = ""
    ids: tuple[int, ...] = ()
    error: str = ""


@dataclass
class Tracked:
    """What the node's thread knows of a task it holds (node thread only)."""

    task_id: str
    task_name: str
    index: int | None
    cancel_grace: float
    kill_after: float | None
    signals: dict[int, dict] = field(default_factory=dict)
    cancel: dict | None = None
    cancel_created: float = 0.0  # monotonic clock
    started: float | None = None  # monotonic clock
    pid: int | None = None
    interrupt_at: float | None = None
    kill_at: float | None = None
    run_seq: int = -1
    run_state: int = boards.WAITING
    progress: tuple | None = None
    stop_recorded: bool = False


class Node:
    """The signalling runtime of one worker node; see the module docstring."""

    def __init__(self, hostname: str, capacity: int) -> None:
        self.hostname = hostname
        self.pid = os.getpid()
        # A pipe the node's thread waits on: the main thread writes -1 when it has events,
        # a run that ended writes its mailbox index (4 bytes, so each write is atomic).
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.board = boards.Board.create(
            boards.board_path(self.pid), capacity, wake_fd=self._wake_write
        )
        # Pool processes inherit the environment: this is how they find the board.
        os.environ[BOARD_VARIABLE] = str(self.board.path)
        self.record_runs = conf.get("TASKSIGNAL_RECORD_RUNS")
        self.reconcile_interval = conf.get("TASKSIGNAL_RECONCILE_INTERVAL")
        self.worker = None
        # Main thread.
        self._admitted: dict[str, Admission] = {}
        self._observed: dict[str, Observed] = {}
        # Main thread -> node thread.
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        # Node thread -> main thread: stops whose outcome is written (the main thread may
        # then let Celery acknowledge the message), and the events it waits on.
        self._stops_written: set[str] = set()
        self._stop_waiters: dict[str, threading.Event] = {}
        # Node thread -> main thread.
        self._kills: collections.deque[str] = collections.deque()
        # Node thread.
        self._tracked: dict[str, Tracked] = {}
        self._listening: set[str] = set()
        self._to_listen: set[str] = set()
        self._to_unlisten: set[str] = set()
        self._woken: set[int] = set()  # mailboxes a run asked the node to look at
        self._completions: list[Completion] = []
        self._ended: list[str] = []
        self._records: dict[str, dict] = {}
        self._connected = False
        self._next_reconcile = 0.0
        self._next_flush = 0.0
        self._next_poll = 0.0
        self._reconnect_at = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: How many signal notifications reached this node (each for a task it holds).
        self.notices = 0
        #: What ``celery inspect tasksignal`` answers; replaced whole by the node's thread.
        self.snapshot: dict = {}
        self._db_fd: int | None = None
        os.register_at_fork(after_in_child=self._forget_in_child)

    # -- lifecycle (main thread) -------------------------------------------------------
    def start(self, worker) -> None:
        """Start the node's thread; ``worker`` is the worker (its pool carries out kills)."""
        global _current
        self.worker = worker
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
        self.board.close(remove=True)
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _wake(self) -> None:
        # A full pipe means the thread has wake-ups pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, WAKE_FOR_EVENTS)

    # -- admission and run ends (main thread, from SignalAwareRequest) ---------------------
    def admit(self, request) -> bool:
        """Whether ``request`` may run: False if a cancel waits for it (then it is completed
        ``skipped`` here); True after giving the run a mailbox with its pending signals."""
        task_id = request.id
        try:
            rows = _main_query(sql.signals_at_receipt(), [task_id])
        except DatabaseError as exc:
            logger.warning("cannot look up signals of %s (%s); it runs unchecked", task_id, exc)
            rows = []
        if any(signal == CANCEL_TASK for _, signal, _, _, _ in rows):
            self._complete_stop(task_id, Outcome.SKIPPED)
            self._push("ended", task_id, request.name, RunState.CANCELLED, "")
            return False
        index = None
        try:
            index = self.board.allocate(task_id)
        except (boards.BoardFull, ValueError) as exc:
            logger.error("task %s has no mailbox (%s): it cannot be signalled", task_id, exc)
        self._admitted[task_id] = Admission(request, index)
        pending = [
            {"id": row_id, "signal": signal, "message": message, "age": age}
            for row_id, signal, message, _completed, age in rows
        ]
        if pending and index is not None:
            self.board.post(index, task_id, [_posted(payload) for payload in pending])
        task = request.task
        kill_after = task.resolved_kill_after()
        self._push(
            "admitted", task_id, request.name, index, pending, task.resolved_cancel_grace(),
            kill_after,
        )  # fmt: skip
        return True

    def run_started(self, request) -> None:
        """A pool process started ``request`` (``on_accepted``)."""
        self._push("started", request.id, request.worker_pid, request.time_start)

    def run_stopped(self, request, stopped) -> None:
        """A run ended by a cancel (:class:`~tasksignal.exceptions.RunStopped`).

        The node's thread writes the cancel's outcome, usually before this is called (the
        run woke it as it ended). This waits until it has, at most ``STOP_WRITE_TIMEOUT``,
        so that Celery acknowledges the message only once the cancel is completed.
        """
        task_id = request.id
        waiter = self._stop_waiters[task_id] = threading.Event()
        self._push("stopped", task_id, stopped.outcome)
        if task_id not in self._stops_written and not waiter.wait(STOP_WRITE_TIMEOUT):
            logger.warning("the outcome of %s is not written yet; it will be", task_id)
        self._stop_waiters.pop(task_id, None)
        self._stops_written.discard(task_id)
        admission = self._admitted.pop(task_id, None)
        self._free(task_id, admission)
        self._push("ended", task_id, request.name, RunState.CANCELLED, "")

    def run_failed(self, request, error: str) -> None:
        """A run ended with an exception (or was killed)."""
        admission = self._admitted.pop(request.id, None)
        if admission is None or admission.killed:
            return  # already ended: the kill recorded it
        self._free(request.id, admission)
        self._push("ended", request.id, request.name, RunState.FAILED, error[:1000])

    def observe(self, request) -> None:
        """Follow a task that is not signal-aware but has a run record (the API started it),
        so that its record does not stay ``queued``."""
        self._observed[request.id] = Observed(request)

    def main_tick(self) -> None:
        """Main thread, every ``MAIN_TICK``: runs that ended, and kills to carry out."""
        reserved = worker_state.reserved_requests
        for task_id, observed in list(self._observed.items()):
            request = observed.request
            if request.time_start is not None and not observed.started:
                observed.started = True
                self._push(
                    "observed_started", task_id, request.name, request.worker_pid,
                    request.time_start,
                )  # fmt: skip
            if request not in reserved:
                del self._observed[task_id]
                self._push("observed_ended", task_id, request.name, request.task.backend)
        for task_id, admission in list(self._admitted.items()):
            # Celery drops a request from its reserved set when it ends; a failure or a
            # stop would have come through on_failure first, so this run succeeded.
            if admission.request not in reserved:
                del self._admitted[task_id]
                self._free(task_id, admission)
                self._push("ended", task_id, admission.request.name, RunState.SUCCEEDED, "")
        while self._kills:
            self._kill(self._kills.popleft())

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
            self._complete_stop(task_id, Outcome.KILLED)
            request.terminate(self.worker.pool, "SIGKILL")

        if not kill_if_running(pid, lambda: self.board.runs(admission.index, task_id, pid), kill):
            return
        admission.killed = True
        run = self.board.read_run(admission.index, task_id)  # the dead process's last word
        del self._admitted[task_id]
        self._free(task_id, admission)
        backend_pid = run.backend_pid if run is not None else 0
        if backend_pid:
            # The killed process's query would otherwise run on until it finished.
            try:
                _main_query("SELECT pg_terminate_backend(%s)", [backend_pid])
            except DatabaseError as exc:
                logger.warning("could not stop the query of killed task %s: %s", task_id, exc)
        logger.warning("killed pid %s to stop cancelled task %s", pid, task_id)
        self._push("ended", task_id, request.name, RunState.CANCELLED, "")

    def _complete_stop(self, task_id: str, outcome: str) -> None:
        try:
            _main_query(sql.complete_cancel_of(), [outcome, "", task_id])
        except DatabaseError as exc:
            logger.warning("could not complete the cancel of %s now (%s); retrying", task_id, exc)
            self._push("complete_cancel", task_id, outcome)

    def _free(self, task_id: str, admission: Admission | None) -> None:
        if admission is not None and admission.index is not None:
            self.board.free(admission.index, task_id)

    def _push(self, *event) -> None:
        self._events.put(event)
        self._wake()

    # -- the node's thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            try:
                self._step(time.monotonic())
                if stopping:
                    self._flush_records(force=True)
                    break
                self._wait(self._next_wakeup(time.monotonic()))
            except DatabaseError as exc:
                logger.warning("tasksignal node: database unavailable (%s); reconnecting", exc)
                self._disconnect()
                if stopping:
                    break
                time.sleep(min(RECONNECT_DELAY, 0.1))
            except Exception:
                logger.exception("tasksignal node error; carrying on")
                if stopping:
                    break
                time.sleep(0.2)
        connections["default"].close()

    def _step(self, now: float) -> None:
        self._take_events()
        if not self._connected:
            if now < self._reconnect_at:
                return
            self._connect()
        self._take_notifications()
        if self._to_listen or self._to_unlisten:
            self._update_listening()
        if now >= self._next_poll:
            self._next_poll = now + MAILBOX_POLL_INTERVAL
            self._poll_mailboxes()
        elif self._woken:
            self._poll_woken()
        self._escalate(now)
        if self._tracked and now >= self._next_reconcile:
            self._reconcile(now)
        if self._completions:
            self._write_completions()
        if now >= self._next_flush:
            self._next_flush = now + RECORD_FLUSH_INTERVAL
            self._flush_records()
        self.snapshot = {
            "connected": self._connected,
            "notices": self.notices,
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

    def _next_wakeup(self, now: float) -> float:
        deadlines = [now + 3600.0]
        if not self._connected:
            deadlines.append(self._reconnect_at)
        if self._tracked:
            deadlines.append(self._next_reconcile)
            if any(t.started is not None for t in self._tracked.values()):
                deadlines.append(self._next_poll)
        if self._records or self._ended:
            deadlines.append(self._next_flush)
        for tracked in self._tracked.values():
            deadlines += [d for d in (tracked.interrupt_at, tracked.kill_at) if d is not None]
        return max(0.0, min(deadlines) - now)

    def _wait(self, timeout: float) -> None:
        readers = [self._wake_read]
        raw = connection.connection if self._connected else None
        if raw is not None:
            if self._take_notifications():
                return  # some arrived while we were busy
            readers.append(raw.fileno())
        ready, _, _ = select.select(readers, [], [], timeout)
        if self._wake_read in ready:
            self._read_wake_ups()

    def _read_wake_ups(self) -> None:
        try:
            data = os.read(self._wake_read, 4096 * 4)
        except BlockingIOError:
            return
        for (index,) in struct.iter_unpack("<i", data[: len(data) - len(data) % 4]):
            if index >= 0:
                self._woken.add(index)

    def _forget_in_child(self) -> None:
        """In a pool process: close what it inherited of the node but must never use (the
        board and the write end of the wake-up pipe it keeps: that is how runs talk)."""
        for fd in (self._db_fd, self._wake_read):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _connect(self) -> None:
        connection.ensure_connection()
        self._db_fd = connection.connection.fileno()
        self._connected = True
        # A new session listens to nothing and may have missed notifications.
        self._listening.clear()
        self._to_listen = set(self._tracked)
        self._next_reconcile = 0.0

    def _disconnect(self) -> None:
        self._connected = False
        self._reconnect_at = time.monotonic() + RECONNECT_DELAY
        with contextlib.suppress(DatabaseError):
            connection.close()

    # -- events from the main thread ---------------------------------------------------
    def _take_events(self) -> None:
        while True:
            try:
                kind, task_id, *details = self._events.get_nowait()
            except queue.Empty:
                return
            getattr(self, f"_on_{kind}")(task_id, *details)

    def _on_admitted(self, task_id, task_name, index, pending, cancel_grace, kill_after):
        tracked = Tracked(task_id, task_name, index, cancel_grace, kill_after)
        self._tracked[task_id] = tracked
        self._to_listen.add(task_id)
        self._to_unlisten.discard(task_id)
        for payload in pending:
            self._deliver(tracked, payload, posted=True)

    def _on_started(self, task_id, pid, time_start) -> None:
        tracked = self._tracked.get(task_id)
        if tracked is None:
            return
        now = time.monotonic()
        tracked.pid = pid
        tracked.started = now - max(0.0, time.time() - time_start)
        if tracked.cancel is not None:
            self._schedule_escalation(tracked, now)
        self._record(
            tracked,
            state=RunState.RUNNING,
            started_at=datetime.datetime.fromtimestamp(time_start, datetime.UTC),
            pid=pid,
        )

    def _on_ended(self, task_id, task_name, state, error) -> None:
        tracked = self._tracked.pop(task_id, None)
        if tracked is None:
            tracked = Tracked(task_id, task_name, None, 0.0, None)
        elif tracked.started is not None:
            self._poll_mailbox(tracked)  # its last progress
        self._to_listen.discard(task_id)
        if task_id in self._listening:
            self._to_unlisten.add(task_id)
        self._ended.append(task_id)
        self._record(
            tracked, state=state, finished_at=datetime.datetime.now(datetime.UTC), error=error
        )

    def _on_complete_cancel(self, task_id, outcome) -> None:
        self._completions.append(Completion(outcome, task_id=task_id))

    def _on_stopped(self, task_id, outcome) -> None:
        tracked = self._tracked.get(task_id)
        if tracked is not None and not tracked.stop_recorded:
            self._poll_mailbox(tracked)  # its own report, if it made one
        if tracked is None or not tracked.stop_recorded:
            self._stop(task_id, outcome, tracked)

    # -- listening and delivery ---------------------------------------------------------
    def _update_listening(self) -> None:
        statements = [f'LISTEN "{notify.signal_channel(t)}"' for t in self._to_listen]
        statements += [f'UNLISTEN "{notify.signal_channel(t)}"' for t in self._to_unlisten]
        with connection.wrap_database_errors:
            connection.connection.execute("; ".join(statements))
        new = [t for t in self._to_listen if t in self._tracked]
        self._listening |= self._to_listen
        self._listening -= self._to_unlisten
        self._to_listen, self._to_unlisten = set(), set()
        if new:  # what was sent between admission and listening
            self._fetch_pending(new)

    def _take_notifications(self) -> int:
        count = 0
        with connection.wrap_database_errors:
            notices = list(connection.connection.notifies(timeout=0))
        for notice in notices:
            count += 1
            try:
                payload = notify.decode(notice.payload)
            except ValueError:
                logger.warning("ignoring a notification on %s: %r", notice.channel, notice.payload)
                continue
            self.notices += 1
            tracked = self._tracked.get(payload["task_id"])
            if tracked is not None:
                payload["age"] = 0.0
                self._deliver(tracked, payload)
        return count

    def _fetch_pending(self, task_ids: list[str]) -> None:
        with connection.cursor() as cursor:
            cursor.execute(sql.pending_signals_of(), [task_ids])
            rows = cursor.fetchall()
        for row_id, task_id, kind, message, age in rows:
            tracked = self._tracked.get(task_id)
            if tracked is not None:
                payload = {"id": row_id, "signal": kind, "message": message, "age": age}
                self._deliver(tracked, payload)

    def _reconcile(self, now: float) -> None:
        self._next_reconcile = now + self.reconcile_interval
        self._fetch_pending(list(self._tracked))

    def _deliver(self, tracked: Tracked, payload: dict, posted: bool = False) -> None:
        """Give ``tracked``'s run a signal once (``posted``: already in its mailbox)."""
        if payload["id"] in tracked.signals:
            return
        tracked.signals[payload["id"]] = payload
        if not posted and tracked.index is not None:
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
        if tracked.kill_after is not None:
            tracked.kill_at = max(tracked.cancel_created, tracked.started) + tracked.kill_after

    # -- mailboxes ------------------------------------------------------------------------
    def _poll_mailboxes(self) -> None:
        self._woken.clear()
        for tracked in self._tracked.values():
            if tracked.started is not None:
                self._poll_mailbox(tracked)

    def _poll_woken(self) -> None:
        woken, self._woken = self._woken, set()
        for tracked in self._tracked.values():
            if tracked.index in woken:
                self._poll_mailbox(tracked)

    def _poll_mailbox(self, tracked: Tracked) -> None:
        if tracked.index is None:
            return
        run = self.board.read_run(tracked.index, tracked.task_id)
        if run is None or run.seq == tracked.run_seq:
            return
        tracked.run_seq = run.seq
        for ack in self.board.take_acks(tracked.index, tracked.task_id):
            tracked.signals.pop(ack.signal_id, None)
            self._completions.append(
                Completion(ack.outcome, ids=(ack.signal_id,), error=ack.error[:255])
            )
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

    def _stop(self, task_id: str, outcome: str, tracked: Tracked | None) -> None:
        """Complete ``task_id``'s cancel with the rung that stopped it (written this step)."""
        if tracked is not None:
            tracked.stop_recorded = True
            tracked.interrupt_at = tracked.kill_at = None
        self._completions.append(Completion(outcome, task_id=task_id))

    def _escalate(self, now: float) -> None:
        for tracked in self._tracked.values():
            if tracked.interrupt_at is not None and now >= tracked.interrupt_at:
                # Again every grace period: task code may swallow one with a bare except.
                tracked.interrupt_at = now + max(tracked.cancel_grace, 0.05)
                self._interrupt(tracked)
            if tracked.kill_at is not None and now >= tracked.kill_at:
                tracked.kill_at = now + KILL_RETRY  # until the main thread managed it
                if tracked.pid == self.pid:
                    tracked.kill_at = None  # solo or threads pool: a kill would end the worker
                else:
                    self._kills.append(tracked.task_id)

    def _interrupt(self, tracked: Tracked) -> None:
        if tracked.index is None:
            return
        run = self.board.read_run(tracked.index, tracked.task_id)
        if run is None or run.run_state not in LIVE_RUN_STATES:
            return  # not begun yet, or over
        if not self.board.request_interrupt(tracked.index, tracked.task_id):
            return
        try:
            if run.pid != os.getpid():
                os.kill(run.pid, INTERRUPT_SIGNAL)
            elif run.thread_ident == threading.main_thread().ident:
                signal.pthread_kill(run.thread_ident, INTERRUPT_SIGNAL)  # solo pool
            else:
                # Threads pool: only the main thread runs signal handlers, so use an async
                # exception instead; it lands when the thread next runs Python bytecode.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(run.thread_ident), ctypes.py_object(_task_cancelled())
                )
        except ProcessLookupError:
            pass

    # -- writing ----------------------------------------------------------------------------
    def _write_completions(self) -> None:
        completions, self._completions = self._completions, []
        try:
            with connection.cursor() as cursor:
                for done in completions:
                    if done.task_id:
                        cursor.execute(sql.complete_cancel_of(), [done.outcome, "", done.task_id])
                    else:
                        cursor.execute(
                            sql.complete_signals(), [done.outcome, done.error, list(done.ids)]
                        )
        except DatabaseError:
            self._completions[:0] = completions  # retried after the reconnect
            raise
        for done in completions:
            if done.task_id:
                self._stops_written.add(done.task_id)
                waiter = self._stop_waiters.get(done.task_id)
                if waiter is not None:
                    waiter.set()

    def _record(self, tracked: Tracked, **fields) -> None:
        if not self.record_runs:
            return
        entry = self._records.get(tracked.task_id)
        if entry is None:
            entry = self._records[tracked.task_id] = {
                "task_name": tracked.task_name,
                "worker": self.hostname,
            }
        entry.update(fields)

    # -- runs of tasks that are not signal-aware, started with a record (the API's) ------
    def _on_observed_started(self, task_id, task_name, pid, time_start) -> None:
        started_at = datetime.datetime.fromtimestamp(time_start, datetime.UTC)
        self._record(
            Tracked(task_id, task_name, None, 0.0, None),
            state=RunState.RUNNING,
            started_at=started_at,
            pid=pid,
        )

    def _on_observed_ended(self, task_id, task_name, backend) -> None:
        # Celery alone knows how a plain task ended; its result backend tells.
        state = CELERY_TO_RUN_STATE.get(backend.get_state(task_id), RunState.FAILED)
        finished_at = datetime.datetime.now(datetime.UTC)
        self._record(
            Tracked(task_id, task_name, None, 0.0, None), state=state, finished_at=finished_at
        )

    def _flush_records(self, force: bool = False) -> None:
        from tasksignal.models import TaskRun

        records, self._records = self._records, {}
        ended, self._ended = self._ended, []
        try:
            _write_records(TaskRun, records, self.hostname)
            if ended:
                with connection.cursor() as cursor:
                    cursor.execute(sql.complete_pending_of(), [Outcome.TOO_LATE, "", ended])
        except DatabaseError:
            if not force:
                for task_id, values in records.items():
                    self._records.setdefault(task_id, {}).update(values)
                self._ended[:0] = ended
            raise


def _write_records(TaskRun, records: dict[str, dict], hostname: str) -> None:
    """Write ``records`` ({task_id: fields}) as ``TaskRun`` rows, with few statements."""
    # A run that started and succeeded since the last write was never visible as running:
    # inserting a row for it is the expensive part of recording (an upsert and its index
    # writes per task). Only update a row someone created for it (the API does).
    brief = [
        task_id
        for task_id, values in records.items()
        if "started_at" in values and values.get("state") == RunState.SUCCEEDED
    ]
    if brief:
        TaskRun.objects.filter(task_id__in=brief).update(
            state=RunState.SUCCEEDED,
            worker=hostname,
            started_at=Coalesce("started_at", Now()),
            finished_at=Now(),
            updated_at=Now(),
        )
        records = {k: v for k, v in records.items() if k not in set(brief)}
    if not records:
        return
    # One statement per distinct set of fields, so a partial update never blanks a field.
    groups: dict[tuple[str, ...], list] = {}
    for task_id, values in records.items():
        groups.setdefault(tuple(sorted(values)), []).append(TaskRun(task_id=task_id, **values))
    for update_fields, objs in groups.items():
        TaskRun.objects.bulk_create(
            objs,
            update_conflicts=True,
            unique_fields=["task_id"],
            update_fields=[*update_fields, "updated_at"],
        )


#: A plain Celery task's end state, as its run record names it.
CELERY_TO_RUN_STATE = {
    "SUCCESS": RunState.SUCCEEDED,
    "FAILURE": RunState.FAILED,
    "REVOKED": RunState.CANCELLED,
}

#: Run states a mailbox reports while a process executes the run.
LIVE_RUN_STATES = frozenset({boards.RUNNING, boards.PAUSED})


def _posted(payload: dict) -> dict:
    """The part of a signal a run needs (not the node's bookkeeping)."""
    return {key: value for key, value in payload.items() if key != "age"}


def _task_cancelled() -> type:
    from tasksignal.exceptions import TaskCancelled

    return TaskCancelled


def _main_query(statement: str, params: list) -> list:
    """Run one statement on this thread's connection; retry once on a connection the server
    closed (a database restart): the worker outlives many of them."""
    for attempt in (1, 2):
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall() if cursor.description else []
        except DatabaseError:
            connection.close()
            if attempt == 2:
                raise
    return []


@task_received.connect
def _observe_recorded(request=None, **kwargs) -> None:
    """A task that is not signal-aware but whose run the producer recorded: follow it."""
    node = current()
    signal_aware = hasattr(request, "_tasksignal_admitted")  # a SignalAwareRequest
    if node is not None and not signal_aware and request.request_dict.get(RECORDED_HEADER):
        node.observe(request)


@inspect_command()
def tasksignal(state, **kwargs) -> dict:
    """What this node's signalling runtime holds: its tasks, their pending signals, whether
    it listens for them, and how many notices reached it (``celery inspect tasksignal``)."""
    node = current()
    return node.snapshot if node is not None else {"error": "no tasksignal node here"}


def _capacity(worker) -> int:
    prefetch = worker.app.conf.worker_prefetch_multiplier or 1
    return MAILBOXES_PER_SLOT * max(16, (worker.concurrency or 1) * max(prefetch, 1))


class NodeStep(bootsteps.StartStopStep):
    """Worker bootstep that runs the node: add it with ``app.steps["worker"].add(NodeStep)``.

    Its board is made when the step is created, before the pool starts its processes, so
    that they inherit where it is. It runs just before the pool: started before it, stopped
    after it, so that a warm shutdown, which waits for the running tasks, still records how
    each of them ended.
    """

    requires = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.node = Node(worker.hostname, _capacity(worker))
        self.tref = None

    def include(self, parent) -> bool:
        """Take this step's place just before the pool in the worker's start order."""
        included = super().include(parent)
        if included:
            parent.steps.remove(self)
            at = next(i for i, step in enumerate(parent.steps) if isinstance(step, Pool))
            parent.steps.insert(at, self)
        return included

    def start(self, worker) -> None:
        """Start the node's thread and the main thread's tick."""
        self.node.start(worker)
        self.tref = worker.timer.call_repeatedly(MAIN_TICK, self.node.main_tick)

    def stop(self, worker) -> None:
        """After the pool stopped: note the last runs' ends, then stop the node."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        self.node.main_tick()
        self.node.stop()
