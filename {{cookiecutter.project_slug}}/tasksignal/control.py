"""Celery's own stop buttons, made safe: ``revoke`` and ``terminate`` through tasksignal.

People stop tasks the way Celery taught them: ``app.control.revoke(task_id)``,
``revoke(task_id, terminate=True)``, ``celery -A config control revoke <id>`` (or
``control terminate SIGKILL <id>``) and Flower's *Revoke* and *Terminate* buttons, which all
broadcast the worker's ``revoke`` control command. Celery's handler of that command keeps the
id in the worker's memory (lost when the worker restarts, celery#8888), never stops a task
that runs, and with ``terminate`` signals whatever process the task was last seen in, which
may run the next task by then.

:func:`install` (the node's bootstep calls it) puts :func:`revoke` and :func:`terminate` in
their place in the worker's main process. For each id the command names:

* a **signal-aware task this worker holds** (prefetched or running): the cancel is written
  through ``CeleryTaskSignal.objects.cancel``, so the ladder runs and records its outcome
  like any cancel; ``terminate`` skips the cooperative grace and goes straight to the
  isolated kill (unless the run stops at a checkpoint first), which proves the process still
  runs this task before it kills. Celery's ``signal`` is not used: the kill is a SIGKILL.
* a **task this worker does not know** (still in the broker, or run by another worker): the
  cancel is written too, so a signal-aware task is skipped wherever and whenever it
  arrives, restarts included. The id is also kept here, so that a plain task with that id
  arriving later is skipped the way Celery skips a revoked one.
* a **plain task this worker holds**: Celery's own handler, unchanged.

The handler runs in the worker's event loop, so it never waits for the database: one thread
writes the cancels, in the order the commands came, and closes its connection after each
batch. The reply says which ids went through tasksignal::

    $ celery -A config control revoke 5b0c…
    ->  worker@host: OK
        tasks 5b0c… cancelled through tasksignal

Limits: every worker receives the broadcast, and one that does not hold a plain task cannot
tell it from a queued signal-aware one, so it writes a cancel that no task completes; the
sweep expires it after ``TASKSIGNAL_SIGNAL_EXPIRY``. Revokes by stamped headers keep
Celery's behaviour, and :func:`celery_revoke` sends Celery's own revoke (for baselines).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from celery import states
from celery.signals import task_received, task_revoked
from celery.utils.collections import LimitedSet
from celery.utils.functional import maybe_list
from celery.worker import state as worker_state
from celery.worker.control import Panel

from tasksignal import node as nodes
from tasksignal.base import SignalAwareTask
from tasksignal.registry import CANCEL_TASK

logger = logging.getLogger(__name__)

#: What the cancel row's message says about where it came from.
REVOKE_MESSAGE = "revoke() through Celery's control"
TERMINATE_MESSAGE = "revoke(terminate=True) through Celery's control"
#: Seconds the writer keeps trying to write a cancel while PostgreSQL is away.
WRITE_PATIENCE = 60.0
#: Seconds between two attempts.
WRITE_RETRY = 0.5
#: Ids revoked while unknown here, kept as Celery keeps its revoked ids (at most this many).
UNKNOWN_LIMIT = 50_000

#: The argument of the ``revoke`` command that keeps Celery's own handler (:func:`celery_revoke`).
THROUGH_TASKSIGNAL = "through_tasksignal"

#: Celery's own handlers of the commands this module takes over, once :func:`install` ran.
celery_handlers: dict[str, Callable[..., Any]] = {}
#: Ids revoked while this worker did not hold them: a plain task arriving is skipped.
revoked_unknown = LimitedSet(maxlen=UNKNOWN_LIMIT)


def install() -> None:
    """Route the worker's ``revoke`` and ``terminate`` control commands through tasksignal
    (in the worker's main process; calling it again changes nothing).

    >>> from celery.worker.control import Panel
    >>> install()
    >>> Panel.data["revoke"] is revoke and celery_handlers["revoke"] is not revoke
    True
    """
    for name, handler in (("revoke", revoke), ("terminate", terminate)):
        if name not in celery_handlers:
            celery_handlers[name] = Panel.data[name]
            Panel.data[name] = handler


def revoke(
    state: Any, task_id: str | list[str], terminate: bool = False, signal: str | None = None,
    **kwargs: Any,
) -> dict[str, str]:  # fmt: skip
    """The ``revoke`` control command: cancel signal-aware tasks through their rows, leave
    plain tasks this worker holds to Celery (see the module docstring)."""
    task_ids = set(maybe_list(task_id) or [])
    node = nodes.current()
    if node is None or not kwargs.pop(THROUGH_TASKSIGNAL, True):
        answer: dict[str, str] = celery_handlers["revoke"](
            state, list(task_ids), terminate, signal, **kwargs
        )
        return answer
    held, plain = set(), set()
    for one in task_ids:
        request = worker_state.requests.get(one)
        if request is None:
            revoked_unknown.add(one)
        elif hasattr(request, "_tasksignal_admitted"):  # a SignalAwareRequest
            held.add(one)
        else:
            plain.add(one)
    ours = sorted(task_ids - plain)
    replies = []
    if ours:
        writer.submit(ours, held, terminate, state.app)
        replies.append(f"tasks {', '.join(ours)} cancelled through tasksignal")
    if plain:
        reply = celery_handlers["revoke"](state, sorted(plain), terminate, signal, **kwargs)
        replies.append(reply.get("ok") or reply.get("error", ""))
    return {"ok": "; ".join(replies)}  # what Celery's handlers answer


def terminate(state: Any, signal: str, task_id: str | list[str], **kwargs: Any) -> dict[str, str]:
    """The ``terminate`` control command: :func:`revoke` with ``terminate=True``."""
    return revoke(state, task_id, terminate=True, signal=signal)


def celery_revoke(app: Any, task_id: str, terminate: bool = False, signal: str = "SIGTERM") -> None:
    """Broadcast Celery's own ``revoke``, which the workers then handle as Celery alone
    does, signal-aware task or not: what the load test's baseline measures tasksignal
    against (``app.control.revoke`` goes through tasksignal)::

        celery_revoke(current_app, result.id, terminate=True, signal="SIGKILL")
    """
    arguments = {"task_id": task_id, "terminate": terminate, "signal": signal}
    app.control.broadcast("revoke", arguments={**arguments, THROUGH_TASKSIGNAL: False})


class CancelWriter:
    """Writes the cancels of control commands from one thread, in the order they came.

    ``submit`` only queues: the worker's event loop never waits for PostgreSQL. The thread
    is started at the first revoke; its connection is closed after each batch (revokes are
    rare) and in pool processes forked meanwhile, which must never use it.
    """

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._fd: int | None = None
        os.register_at_fork(after_in_child=self._forget_in_child)

    def submit(self, task_ids: list[str], held: set[str], terminate: bool, app: Any) -> None:
        """Queue the cancels of ``task_ids``; ``held`` are those this worker holds."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="tasksignal-revoke"
            )
        self._executor.submit(self._write, task_ids, held, terminate, app)

    def settle_skipped(self, task_id: str) -> None:
        """Complete the cancel written for ``task_id``, a plain task Celery skipped here."""
        if self._executor is not None:
            self._executor.submit(self._complete_skipped, task_id)

    def _write(self, task_ids: list[str], held: set[str], terminate: bool, app: Any) -> None:
        from tasksignal.models import CeleryTaskSignal

        message = TERMINATE_MESSAGE if terminate else REVOKE_MESSAGE
        todo = list(task_ids)

        def write() -> None:
            while todo:
                task_id = todo[0]
                # A task not held here may be over: its cancel is then too_late at once,
                # rather than pending until the sweep expires it; once, though every
                # worker hears the revoke.
                finished = task_id not in held and _finished(app, task_id)
                cancels = CeleryTaskSignal.objects.filter(task_id=task_id, signal=CANCEL_TASK)
                if not (finished and cancels.exists()):
                    CeleryTaskSignal.objects.cancel(task_id, message, finished=finished)
                todo.pop(0)
                node = nodes.current()
                if terminate and task_id in held and node is not None:
                    node.escalate_now(task_id)

        self._with_database(write, f"write the cancels of revoked tasks {task_ids}")

    def _complete_skipped(self, task_id: str) -> None:
        from tasksignal.models import CeleryTaskSignal
        from tasksignal.states import Outcome

        def complete() -> None:
            CeleryTaskSignal.objects.pending(task_id, CANCEL_TASK).complete(Outcome.SKIPPED)

        self._with_database(complete, f"complete the cancel of skipped task {task_id}")

    def _with_database(self, work: Callable[[], None], what: str) -> None:
        """Run ``work`` (again while PostgreSQL is away, ``WRITE_PATIENCE`` at most), then
        close the thread's connection."""
        from django.db import DatabaseError, connection

        deadline = time.monotonic() + WRITE_PATIENCE
        try:
            while True:
                try:
                    connection.ensure_connection()
                    self._fd = connection.connection.fileno()
                    work()
                    return
                except DatabaseError as exc:
                    connection.close()
                    if time.monotonic() >= deadline:
                        logger.error("could not %s: %s", what, exc)
                        return
                    logger.warning("could not %s yet (%s); retrying", what, exc)
                    time.sleep(WRITE_RETRY)
        finally:
            self._fd = None
            connection.close()

    def _forget_in_child(self) -> None:
        # A pool process forked while the thread held a connection: close the descriptor
        # so that the connection's cleanup in the child cannot end the parent's session.
        self._executor = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _finished(app: Any, task_id: str) -> bool:
    """Whether the result backend knows ``task_id`` finished (not if it cannot be asked)."""
    try:
        return app.backend.get_state(task_id) in states.READY_STATES
    except Exception as exc:
        logger.warning("cannot read the state of revoked task %s (%s)", task_id, exc)
        return False


writer = CancelWriter()


@task_received.connect
def _revoke_plain_arrival(request: Any = None, **kwargs: object) -> None:
    """A plain task revoked before it reached this worker: Celery skips it at execution,
    as it would have skipped it at receipt had its own handler kept the id."""
    if request.id in revoked_unknown and not hasattr(request, "_tasksignal_admitted"):
        worker_state.revoked.add(request.id)


@task_revoked.connect
def _settle_plain_skip(sender: Any = None, request: Any = None, **kwargs: object) -> None:
    """A plain task skipped for such a revoke: its cancel row is done (``skipped``).

    ``request`` is the task's context here, not its worker request: the task (``sender``)
    says whether it is signal-aware (those settle their own cancels)."""
    plain = not isinstance(sender, SignalAwareTask)
    if plain and request is not None and request.id in revoked_unknown:
        writer.settle_skipped(request.id)
