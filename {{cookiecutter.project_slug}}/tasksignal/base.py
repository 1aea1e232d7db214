"""``SignalAwareTask``: a Celery task base whose runs can be cancelled, paused and resumed.

Consumer side (the task)::

    from celery import shared_task

    from tasksignal.base import SignalAwareTask


    @shared_task(base=SignalAwareTask, bind=True, cancel_grace=2.0, kill_after=10.0)
    def resize_images(self, paths):
        for done, path in enumerate(paths):
            self.checkpoint()  # raises TaskCancelled, or blocks while paused
            resize(path)
            self.set_progress(done + 1, len(paths))
        return len(paths)

Producer side (anywhere in Django: a view, the admin, the shell, another task)::

    from tasksignal.models import CeleryTaskSignal

    result = resize_images.delay(paths)
    CeleryTaskSignal.objects.cancel(result.id, message="user pressed stop")

    # Everything it started too (chains, groups, chords, children): tasksignal/cascade.py
    CeleryTaskSignal.objects.cancel(result.id, cascade=True)

    # By what it works on, rather than by a saved id: tasksignal/subjects.py
    resize_images.delay_for(album, paths)
    CeleryTaskSignal.objects.cancel_for(album)

The escalation ladder for a cancel (defaults in ``tasksignal/conf.py``):

1. **Skipped**: cancelled before it started, the body never runs.
2. **Cooperative**: the next ``checkpoint()`` raises :class:`TaskCancelled`.
3. **Interrupted**: no checkpoint within ``cancel_grace`` seconds; ``TaskCancelled`` is
   raised in the task's thread wherever it is (``time.sleep``, socket I/O, Python loops).
4. **Killed**: still running ``kill_after`` seconds after the cancel (C code holding the
   GIL, or a bare ``except:`` swallowing the interrupt); the worker's main process kills
   that process only after proving, while it is frozen, that it still runs this task
   (``kill.py``).

Whatever the step, the run ends in Celery state ``REVOKED`` and its signal row is
completed exactly once with the step as ``outcome``. On steps 2 and 3 cleanup runs in the
task process: the task's open transactions roll back as ``TaskCancelled`` unwinds them,
``on_cancel`` and the callbacks given to ``add_cleanup`` run once, processes the task
started are terminated, and a database connection cut mid-query is closed. On step 4
only the task's subprocesses are reaped: a killed process runs no Python cleanup.

Limits: interrupts and kills need the prefork pool (see the README for solo, threads and
gevent); ``checkpoint()`` costs an attribute read when nothing is pending.
"""

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import states
from celery.contrib.django.task import DjangoTask
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult
from django.db import connections, models
from psycopg import pq

from tasksignal import conf, subjects
from tasksignal.exceptions import RunStopped, TaskCancelled
from tasksignal.runtime import Run, runtime, this_thread
from tasksignal.states import Outcome

logger = logging.getLogger(__name__)


if TYPE_CHECKING:  # celery-types makes Task generic; Celery's class takes no parameters
    _TaskBase = DjangoTask[Any, Any]
else:
    _TaskBase = DjangoTask

_Callback = TypeVar("_Callback", bound=Callable[..., object])


class SignalAwareTask(_TaskBase):
    """A Celery task whose running instances obey :class:`CeleryTaskSignal` rows."""

    abstract = True
    #: The worker-side request class: it lets the worker node skip a cancelled task before
    #: any pool process sees it and record how each run ends (``tasksignal/request.py``).
    Request = "tasksignal.request:SignalAwareRequest"

    #: Seconds after a cancel before a task that has not reached a checkpoint is
    #: interrupted. ``None`` means the ``TASKSIGNAL_CANCEL_GRACE`` setting.
    cancel_grace: float | None = None

    #: Seconds after a cancel at which a task still running is killed (prefork only).
    #: ``None`` means the ``TASKSIGNAL_KILL_AFTER`` setting.
    kill_after: float | None = None

    def resolved_cancel_grace(self) -> float:
        """``cancel_grace``, or the setting when the task does not set it."""
        return (
            conf.get("TASKSIGNAL_CANCEL_GRACE") if self.cancel_grace is None else self.cancel_grace
        )

    def resolved_kill_after(self) -> float:
        """``kill_after``, or the setting when the task does not set it."""
        return conf.get("TASKSIGNAL_KILL_AFTER") if self.kill_after is None else self.kill_after

    # -- called from the task body ----------------------------------------------------
    def checkpoint(self) -> None:
        """React to pending signals: raise :class:`TaskCancelled`, block while paused, or run
        registered handlers. Costs one memory read when nothing is pending.
        """
        run = this_thread.run
        if run is not None and run.view[run.attention_at] != run.attention_seen:
            runtime.handle_attention(self, run)

    def set_progress(self, current: float, total: float | None = None, message: str = "") -> None:
        """Report progress; the worker node records it in the run's ``TaskRun``."""
        run = this_thread.run
        if run is not None and run.mailbox is not None:
            runtime.report_progress(run, current, total, message)

    def add_cleanup(self, callback: _Callback, *args: Any, **kwargs: Any) -> _Callback:
        """Run ``callback(*args, **kwargs)`` if this run is cancelled (last added, first run).

        Returns ``callback``, so it also works as a decorator inside the task body.
        """
        run = this_thread.run
        if run is None:
            raise RuntimeError("add_cleanup() is only available inside a running task")
        run.cleanups.append((callback, args, kwargs))
        return callback

    @property
    def run_state(self) -> dict[str, Any]:
        """A dict private to the current run, shared with custom signal handlers."""
        run = this_thread.run
        if run is None:
            raise RuntimeError("run_state is only available inside a running task")
        return run.state

    def on_cancel(self, exc: TaskCancelled) -> None:
        """Override to clean up after a cancel (called once, after transactions rolled back)."""

    # -- called by the producer -----------------------------------------------------------
    def delay_for(self, subject: models.Model, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """``delay(*args, **kwargs)``, recording that the task works on ``subject`` (a model
        instance): ``CeleryTaskSignal.objects.cancel_for(subject)`` then stops it."""
        return self.apply_async_for(subject, args, kwargs)

    def apply_async_for(
        self,
        subject: models.Model,
        args: Any = None,
        kwargs: Any = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """``apply_async(args, kwargs, **options)`` for ``subject`` (see :meth:`delay_for`).

        The subject is recorded before the message is sent (one INSERT), so a cancel for
        it can never miss the task."""
        task_id = subjects.subject_options(options)
        subjects.record(task_id, subject)
        return self.apply_async(args, kwargs, **options)

    # -- Celery integration -------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        task_id = request.id
        if request.called_directly or task_id is None:
            return super().__call__(*args, **kwargs)
        run = runtime.begin(task_id, self.name)
        try:
            if run.cancel is not None:  # cancelled after the node handed the task over
                raise TaskCancelled(task_id, Outcome.SKIPPED)
            # Celery's trace has already pushed the request: call run(), not super().
            result = self.run(*args, **kwargs)
            run.finished = True
        except TaskCancelled as exc:
            stopped = self._stop(run, exc)
        except BaseException:
            if not run.interrupted:
                runtime.end(run)
                raise
            # Task code turned our interrupt into another exception: still a cancel.
            stopped = self._stop(run, TaskCancelled(task_id, Outcome.INTERRUPTED))
        else:
            runtime.end(run)
            return result
        # Raised here, outside the except blocks, so Celery's trace formats only this frame.
        raise stopped

    def _stop(self, run: Run, exc: TaskCancelled) -> RunStopped:
        """Clean up after a cancel; return what tells the worker how the run stopped."""
        run.finished = True
        outcome = Outcome.INTERRUPTED if run.interrupted else exc.outcome
        cleanup_ok = outcome == Outcome.SKIPPED or self._clean_up(run, exc, outcome)
        runtime.end(run, stop_outcome=outcome)
        logger.info("task %s[%s] cancelled (%s)", self.name, run.task_id, outcome)
        stored = self._store_revoked(run.task_id, RunStopped.reason_for(outcome, cleanup_ok))
        return RunStopped(run.task_id, outcome, cleanup_ok, stored)

    def _store_revoked(self, task_id: str, reason: str) -> bool:
        """Store ``REVOKED`` from the pool process: the worker's main process would
        otherwise, in the one thread all its messages go through. False if not stored."""
        if self.ignore_result and not self.store_errors_even_if_ignored:
            return False
        try:
            self.backend.store_result(
                task_id, TaskRevokedError(reason), states.REVOKED, request=self.request
            )
        except Exception as exc:  # the main process tries again (and says so if it fails)
            logger.warning("could not store REVOKED for %s: %r", task_id, exc)
            return False
        return True

    def _clean_up(self, run: Run, exc: TaskCancelled, outcome: str) -> bool:
        ok = True
        if outcome == Outcome.INTERRUPTED:
            _close_interrupted_connections()
        callbacks = [(self.on_cancel, (exc,), {}), *reversed(run.cleanups)]
        run.cleanups.clear()
        for callback, args, kwargs in callbacks:
            try:
                callback(*args, **kwargs)
            except Exception:
                ok = False
                logger.exception("cleanup %r of task %s failed", callback, run.task_id)
        try:
            runtime.reap_subprocesses()
        except Exception:
            ok = False
            logger.exception("could not reap the subprocesses of task %s", run.task_id)
        return ok


def _close_interrupted_connections() -> None:
    """Close this thread's database connections after an interrupt.

    The interrupt may have landed mid-query: such a connection cannot be reused, and the
    server would go on running the query after the client left, so it is cancelled first.
    """
    for connection in connections.all(initialized_only=True):
        raw = connection.connection
        if (
            raw is not None
            and not raw.closed
            and raw.info.transaction_status == pq.TransactionStatus.ACTIVE
        ):
            try:
                raw.cancel_safe(timeout=2.0)
            except Exception:
                logger.warning("could not cancel the query of an interrupted task")
        connection.close()
