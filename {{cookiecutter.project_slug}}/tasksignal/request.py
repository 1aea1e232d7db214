"""The worker-side request of a signal-aware task: where the worker node hooks into Celery.

Celery makes one ``Request`` per task message in the worker's main process, of the class
the task names (``Task.Request``; ``SignalAwareTask`` names this one). Its methods run in
the main process's event loop, so they only touch the node's memory, except for the two
database statements that must happen before Celery moves on:

* ``revoked()``, which Celery calls just before handing the task to its pool: besides
  Celery's own revokes, the node looks up this task's cancel, once. A cancel pending, or
  completed earlier (a message delivered again after its worker died), skips the task the
  way Celery skips a revoked one (``REVOKED``, a ``task-revoked`` event, the
  ``task_revoked`` signal, the message acknowledged) and no pool process sees it.
  Otherwise the node gives the run its mailbox (``board.py``).
* ``on_failure()`` with :class:`~tasksignal.exceptions.RunStopped`, which ends every run
  stopped by a cancel: the node completes the cancel with the run's outcome, then Celery
  announces the revoke. The signal is completed before the message is acknowledged, so a
  worker that dies in between leaves a completed cancel and a message that is skipped
  when it comes back, never a task that runs again.

Without a node in this worker (``tasksignal.node.NodeStep`` not added) the request
behaves like Celery's.
"""

from celery.worker.request import Request
from kombu.utils.encoding import safe_repr

from tasksignal import node as nodes
from tasksignal.exceptions import RunStopped


class SignalAwareRequest(Request):
    """Celery's request, with the worker node's admission and stop hooks."""

    _tasksignal_admitted = None

    def revoked(self) -> bool:
        """Celery's revoke check, then (once) the node's: is a cancel waiting for this task?"""
        if super().revoked():
            return True
        node = nodes.current()
        if node is None or self._tasksignal_admitted is not None:
            return False
        self._tasksignal_admitted = node.admit(self)
        if self._tasksignal_admitted:
            return False
        # Celery's own announcement of a revoked task, with our reason.
        self._announce_revoked("cancelled (skipped)", False, None, False)
        return True

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        """A run that did not succeed: a stopped one is a revoke, anything else Celery's."""
        node = nodes.current()
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if node is None or not self._tasksignal_admitted:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        if isinstance(exc, RunStopped):
            node.run_stopped(self, exc)
            self._announce_revoked(exc.reason, False, None, False)
            return None
        node.run_failed(self, safe_repr(exc))
        return super().on_failure(exc_info, send_failed_event, return_ok)
