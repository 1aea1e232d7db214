"""The in-worker runtime: keeps each worker process's view of pending signals current.

Every process that runs signal-aware tasks (each prefork child) has one :class:`Runtime`
with two daemon threads:

``listener``
    Subscribes to the notification channel and, every reconcile interval, reads all
    pending signals from the database (covering notifications lost while Redis was away
    or sent before this process subscribed). It hands a signal for the running task to
    that task (:class:`Run`) and, when a cancel is not honoured within the task's
    ``cancel_grace``, interrupts the task's thread (``SIGUSR2`` plus a handler that
    raises :class:`~tasksignal.exceptions.TaskCancelled`; billiard keeps ``SIGUSR1`` for
    Celery's soft time limit).
``writer``
    Completes signals the task handled and writes the :class:`~tasksignal.models.TaskRun`
    records in batches, on its own database connection, so neither happens inside the
    task's own transaction nor costs the task a round trip.

The task's side (``checkpoint()``) only reads attributes of its :class:`Run`: no database
or Redis round trip. The interrupt is guarded by the run object itself: the listener
flags one :class:`Run`, and the handler raises only if that exact run is still the
running, unfinished one, so a late signal can never hit the next task.
"""

import collections
import ctypes
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

import psutil
import redis
from django.db import DatabaseError, connections
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from tasksignal import conf, notify
from tasksignal.exceptions import TaskCancelled
from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK, get_signal_kind
from tasksignal.slots import RunSlot

logger = logging.getLogger(__name__)

INTERRUPT_SIGNAL = signal.SIGUSR2
#: How often the writer flushes run records (seconds).
RECORD_FLUSH_INTERVAL = 0.25
#: How many finished (not cancelled) task ids a process remembers, to answer a late cancel
#: with ``too_late``.
RECENT_RUNS = 1000
#: Wait at most this long at a run's start for the first read of pending signals.
FIRST_SYNC_TIMEOUT = 5.0


class Run:
    """One execution of a signal-aware task in this process, shared by its two sides.

    The listener appends to ``inbox`` and raises ``attention``; the task's thread reads
    them at checkpoints. ``finished`` is set by the task's thread the moment the body
    stops, after which nothing may be raised into it.
    """

    __slots__ = (
        "attention",
        "cancel",
        "cancel_grace",
        "cleanups",
        "finished",
        "inbox",
        "interrupt_at",
        "interrupt_requested",
        "interrupted",
        "paused",
        "seen",
        "state",
        "task_id",
        "task_name",
        "thread_ident",
        "wake",
    )

    def __init__(self, task_id: str, task_name: str, cancel_grace: float) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.cancel_grace = cancel_grace
        self.thread_ident = threading.get_ident()
        self.attention = False
        self.inbox: collections.deque[dict] = collections.deque()
        self.seen: set[int] = set()
        self.cancel: dict | None = None
        self.interrupt_at = 0.0
        self.interrupt_requested = False
        self.interrupted = False
        self.finished = False
        self.paused = False
        self.wake = threading.Event()
        self.cleanups: list = []
        self.state: dict = {}


class Runtime:
    """Per-process signalling state and its threads; use the module's :data:`runtime`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pid: int | None = None
        self.is_pool_child = False
        self._reset()

    def _reset(self) -> None:
        self.current: Run | None = None
        self.hostname = ""
        self._pending: dict[str, dict[int, dict]] = {}
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_RUNS)
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._records: dict[str, dict] = {}
        self._slot: RunSlot | None = None

    # -- lifecycle ------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the threads once per process (again after a fork: threads do not survive it)."""
        if self.pid == os.getpid():
            return
        with self._lock:
            if self.pid == os.getpid():
                return
            self._reset()  # state inherited through fork belongs to the parent
            self.pid = os.getpid()
            self._slot = RunSlot()
            for name, target in (("listener", self._listen), ("writer", self._write)):
                threading.Thread(target=target, name=f"tasksignal-{name}", daemon=True).start()

    def stop(self) -> None:
        """Stop the threads and remove this process's slot (process shutdown)."""
        self._stopping.set()
        self._outbox.put(None)
        if self._slot is not None:
            self._slot.remove()

    # -- the task's side ------------------------------------------------------------
    def begin(self, task_id: str, task_name: str, hostname: str, cancel_grace: float) -> Run:
        """Make ``task_id`` this process's current run and hand it signals already pending."""
        self.ensure_started()
        self.hostname = hostname
        if not self._synced.wait(FIRST_SYNC_TIMEOUT):
            logger.warning("no pending-signal read yet; %s starts without it", task_id)
        run = Run(task_id, task_name, cancel_grace)
        # Installed per run, not once: billiard may reset handlers between tasks.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(INTERRUPT_SIGNAL) is not _raise_if_interrupted
        ):
            signal.signal(INTERRUPT_SIGNAL, _raise_if_interrupted)
        with self._lock:
            self.current = run
            for payload in self._pending.get(task_id, {}).values():
                self._deliver(run, payload)
        self._slot.write(task_id)
        self.record(run, state="running", started_at=timezone.now(), pid=self.pid)
        return run

    def end(self, run: Run, state: str) -> None:
        """End ``run``: it no longer receives signals; what it left unhandled is ``too_late``."""
        run.finished = True
        self._slot.clear()
        with self._lock:
            self.current = None
            if state != "cancelled":  # a cancel that arrives for it now came too late
                self._recent.append(run.task_id)
            unhandled = [p["id"] for p in run.inbox if p["signal"] != CANCEL_TASK]
            if run.cancel is not None and state != "cancelled":
                unhandled.append(run.cancel["id"])
            self._pending.pop(run.task_id, None)
        if unhandled:
            self.complete(unhandled, "too_late")
        self.record(run, state=state, finished_at=timezone.now())

    def record(self, run: Run, **fields) -> None:
        """Queue fields of ``run``'s :class:`TaskRun` record for the next batched write."""
        if not conf.get("TASKSIGNAL_RECORD_RUNS"):
            return
        with self._lock:
            entry = self._records.get(run.task_id)
            if entry is None:
                entry = self._records[run.task_id] = {
                    "task_name": run.task_name,
                    "worker": self.hostname,
                }
            entry.update(fields)

    def complete(self, signal_ids: list[int], outcome: str) -> None:
        """Queue these signals for the writer to complete with ``outcome`` (its own transaction)."""
        self._outbox.put((tuple(signal_ids), outcome))

    def handle_attention(self, task, run: Run) -> None:
        """Act on what the listener handed ``run``: raise, pause, or run custom handlers."""
        run.attention = run.cancel is not None  # a cancel keeps raising until it is honoured
        while run.inbox:
            payload = run.inbox.popleft()
            kind = payload["signal"]
            if kind == CANCEL_TASK:
                raise TaskCancelled(run.task_id, "cooperative", payload.get("message", ""))
            if kind == PAUSE_TASK:
                self._pause(task, run, payload)
            elif kind == RESUME_TASK:
                self.complete([payload["id"]], "not_paused")
            else:
                self._run_handler(task, run, payload)
        if run.cancel is not None:
            raise TaskCancelled(run.task_id, "cooperative", run.cancel.get("message", ""))

    def _pause(self, task, run: Run, payload: dict) -> None:
        self.complete([payload["id"]], "paused")
        run.paused = True
        self.record(run, state="paused")
        try:
            while True:
                run.wake.clear()
                while run.inbox:
                    waiting = run.inbox.popleft()
                    kind = waiting["signal"]
                    if kind == CANCEL_TASK:
                        raise TaskCancelled(run.task_id, "cooperative", waiting.get("message", ""))
                    if kind == RESUME_TASK:
                        self.complete([waiting["id"]], "resumed")
                        return
                    if kind == PAUSE_TASK:
                        self.complete([waiting["id"]], "paused")
                    else:
                        self._run_handler(task, run, waiting)
                run.wake.wait(1.0)
        finally:
            run.paused = False
            run.attention = run.cancel is not None or bool(run.inbox)
            self.record(run, state="running")

    def _run_handler(self, task, run: Run, payload: dict) -> None:
        from tasksignal.models import CeleryTaskSignal

        kind = get_signal_kind(payload["signal"])
        row = CeleryTaskSignal(
            pk=payload["id"],
            task_id=run.task_id,
            signal=payload["signal"],
            message=payload.get("message", ""),
        )
        try:
            kind.handler(task, row)
        except Exception:
            logger.exception("handler for signal %s of task %s failed", kind.name, run.task_id)
            self.complete([payload["id"]], "failed")
        else:
            self.complete([payload["id"]], "handled")

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

    # -- the listener thread --------------------------------------------------------
    def _deliver(self, run: Run, payload: dict) -> None:
        """Hand ``payload`` to ``run`` once (caller holds the lock)."""
        if payload["id"] in run.seen:
            return
        run.seen.add(payload["id"])
        if payload["signal"] == CANCEL_TASK and run.cancel is None:
            run.cancel = payload
            run.interrupt_at = time.monotonic() + run.cancel_grace
        run.inbox.append(payload)
        run.attention = True
        run.wake.set()

    def _on_notification(self, payload: dict) -> None:
        payload["_received"] = time.monotonic()
        with self._lock:
            self._pending.setdefault(payload["task_id"], {})[payload["id"]] = payload
            run = self.current
            if run is not None and run.task_id == payload["task_id"]:
                self._deliver(run, payload)
                return
            finished_here = payload["task_id"] in self._recent
        if finished_here:
            self.complete([payload["id"]], "too_late")

    def _reconcile(self) -> None:
        from tasksignal.models import CeleryTaskSignal

        started = time.monotonic()
        rows = list(CeleryTaskSignal.objects.pending().values("id", "task_id", "signal", "message"))
        fresh: dict[str, dict[int, dict]] = {}
        for row in rows:
            fresh.setdefault(row["task_id"], {})[row["id"]] = row
        with self._lock:
            # A notification that came in while the query ran may be newer than it.
            for task_id, payloads in self._pending.items():
                for signal_id, payload in payloads.items():
                    if payload.get("_received", 0.0) >= started:
                        fresh.setdefault(task_id, {})[signal_id] = payload
            self._pending = fresh
            run = self.current
            if run is not None:
                for payload in fresh.get(run.task_id, {}).values():
                    self._deliver(run, payload)
            too_late = [
                signal_id
                for task_id in self._recent
                for signal_id in fresh.get(task_id, ())
                if not (run is not None and run.task_id == task_id)
            ]
        if too_late:
            self.complete(too_late, "too_late")
        self._synced.set()

    def _interrupt_if_due(self) -> float:
        """Interrupt the current run if its cancel grace is over; return seconds to next check."""
        run = self.current
        if run is None or run.cancel is None or run.finished:
            return 1.0
        now = time.monotonic()
        if now < run.interrupt_at:
            return run.interrupt_at - now
        # Repeated every grace period: task code may swallow one interrupt with a bare except.
        run.interrupt_at = now + max(run.cancel_grace, 0.05)
        run.interrupt_requested = True
        if run.thread_ident == threading.main_thread().ident:
            signal.pthread_kill(run.thread_ident, INTERRUPT_SIGNAL)
        else:
            # Threads pool: only the main thread runs signal handlers, so use an async
            # exception instead; it lands when the thread next runs Python bytecode.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(run.thread_ident), ctypes.py_object(TaskCancelled)
            )
        return run.cancel_grace

    def _listen(self) -> None:
        channel = conf.get("TASKSIGNAL_CHANNEL")
        interval = conf.get("TASKSIGNAL_RECONCILE_INTERVAL")
        pubsub = None
        next_subscribe = next_reconcile = 0.0
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                if pubsub is None and now >= next_subscribe:
                    next_subscribe = now + 1.0
                    pubsub = notify.client().pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(channel)
                if now >= next_reconcile:
                    next_reconcile = now + interval
                    self._reconcile()
                wait = min(next_reconcile - time.monotonic(), self._interrupt_if_due())
                wait = max(wait, 0.0)
                if pubsub is None:
                    time.sleep(min(wait, max(next_subscribe - time.monotonic(), 0.0)))
                    continue
                message = pubsub.get_message(timeout=wait)
                if message is not None and message["type"] == "message":
                    self._on_notification(notify.decode(message["data"]))
            except redis.RedisError as exc:
                logger.warning("signal notifications unavailable (%s); reading the database", exc)
                if pubsub is not None:
                    pubsub.reset()
                pubsub = None
            except DatabaseError as exc:
                logger.warning("could not read pending signals: %s", exc)
                connections["default"].close()
                time.sleep(0.2)
            except Exception:
                logger.exception("tasksignal listener error; carrying on")
                time.sleep(0.2)

    # -- the writer thread ----------------------------------------------------------
    def _write(self) -> None:
        next_flush = time.monotonic() + RECORD_FLUSH_INTERVAL
        while True:
            try:
                item = self._outbox.get(timeout=max(next_flush - time.monotonic(), 0.0))
            except queue.Empty:
                item = ()
            try:
                if item is None:
                    self._flush_records()
                    return
                if item:
                    self._complete_now(*item)
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + RECORD_FLUSH_INTERVAL
                    self._flush_records()
            except DatabaseError as exc:
                logger.warning("tasksignal writer: %s; retrying", exc)
                connections["default"].close()
                if item:
                    self._outbox.put(item)
                time.sleep(0.5)
            except Exception:
                logger.exception("tasksignal writer error; carrying on")

    def _complete_now(self, signal_ids: tuple[int, ...], outcome: str) -> None:
        from tasksignal.models import CeleryTaskSignal

        CeleryTaskSignal.objects.filter(pk__in=signal_ids).complete(outcome)
        with self._lock:
            for payloads in self._pending.values():
                for signal_id in signal_ids:
                    payloads.pop(signal_id, None)

    def _flush_records(self) -> None:
        from tasksignal.models import TaskRun

        with self._lock:
            records, self._records = self._records, {}
        # A run that started and succeeded since the last write was never visible as running:
        # inserting a row for it is the expensive part of recording (an upsert and its index
        # writes per task). Only update a row someone created for it (the API does).
        brief = [
            task_id
            for task_id, values in records.items()
            if "started_at" in values and values.get("state") == TaskRun.State.SUCCEEDED
        ]
        if brief:
            TaskRun.objects.filter(task_id__in=brief).update(
                state=TaskRun.State.SUCCEEDED,
                worker=self.hostname,
                pid=self.pid,
                started_at=Coalesce("started_at", Now()),
                finished_at=Now(),
                updated_at=Now(),
            )
            for task_id in brief:
                del records[task_id]
        if not records:
            return
        fields = ["task_name", "worker", "state", "pid", "started_at", "finished_at"]
        fields += ["progress_current", "progress_total", "progress_message"]
        # One statement per distinct set of fields, so a partial update never blanks a field.
        groups: dict[tuple[str, ...], list[TaskRun]] = {}
        for task_id, values in records.items():
            key = tuple(sorted(name for name in values if name in fields))
            groups.setdefault(key, []).append(TaskRun(task_id=task_id, **values))
        for update_fields, objs in groups.items():
            TaskRun.objects.bulk_create(
                objs,
                update_conflicts=True,
                unique_fields=["task_id"],
                update_fields=[*update_fields, "updated_at"],
            )


def _has_children() -> bool:
    """Whether this process has children; on Linux read from /proc, not a process-table scan."""
    files = list(Path(f"/proc/{os.getpid()}/task").glob("*/children"))
    if not files:
        return True  # no such files on this system: let psutil look
    try:
        return any(path.read_text().strip() for path in files)
    except OSError:
        return True


def _raise_if_interrupted(signum, frame) -> None:
    """``SIGUSR2`` handler: raise into the task only if the flagged run is still running."""
    run = runtime.current
    if run is not None and run.interrupt_requested and not run.finished:
        run.interrupt_requested = False
        run.interrupted = True
        raise TaskCancelled(run.task_id, "interrupted", (run.cancel or {}).get("message", ""))


#: The runtime of this process.
runtime = Runtime()


def _renew_lock_after_fork() -> None:
    # A lock held by a parent's thread at fork time would stay held forever in the child.
    runtime._lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_after_fork)


def connect_worker_signals() -> None:
    """Start the runtime in each prefork child as it starts, and stop it as it exits."""
    from celery.signals import worker_process_init, worker_process_shutdown

    worker_process_init.connect(_on_worker_process_init, weak=False)
    worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)


def _on_worker_process_init(**kwargs) -> None:
    runtime.ensure_started()
    runtime.is_pool_child = True


def _on_worker_process_shutdown(**kwargs) -> None:
    runtime.stop()
