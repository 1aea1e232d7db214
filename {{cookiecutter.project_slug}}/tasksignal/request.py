"""The worker-side request of a signal-aware task: where the worker node hooks into Celery.

Celery makes one ``Request`` per task message in the worker's main process, of the class
the task names (``Task.Request``; ``SignalAwareTask`` names this one). Its methods run in
the main process's event loop, which every message of the worker goes through, so they
only touch the node's memory and never wait for the database:

* ``revoked()``, which Celery calls just before handing the task to its pool: besides
  Celery's own revokes, the node holds the task back the first time and looks up its
  cancel (``Node.hold``). A cancel pending, or completed earlier (a message delivered
  again after its worker died), skips the task the way Celery skips a revoked one
  (``REVOKED``, a ``task-revoked`` event, the ``task_revoked`` signal, the message
  acknowledged) and no pool process sees it. Otherwise the node gives the run its
  mailbox (``board.py``) and hands the task to the pool again.
* ``on_failure()`` with :class:`~tasksignal.exceptions.RunStopped`, which ends every run
  stopped by a cancel: once the node has completed the cancel with the run's outcome,
  Celery announces the revoke. The signal is completed before the message is
  acknowledged, so a worker that dies in between leaves a completed cancel and a message
  that is skipped when it comes back, never a task that runs again. The pool process has
  stored ``REVOKED`` already, so the announcement does not store it again.
* ``announce_cancelled()``, the announcement of both: it also stores ``REVOKED`` for what
  the message would have led to, the rest of its chain and its chord's body, which can no
  longer run (celery #10526: Celery would count a header task's revoke and, at the last
  one, store a ``ChordError`` for the body).

Without a node in this worker (``tasksignal.node.NodeStep`` not added) the request
behaves like Celery's.
"""

from billiard.einfo import ExceptionInfo
from celery import signature
from celery.worker.request import Request
from kombu.utils.encoding import safe_repr

from tasksignal import lineage
from tasksignal import node as nodes
from tasksignal.exceptions import RunStopped


class SignalAwareRequest(Request):
    """Celery's request, with the worker node's admission and stop hooks."""

    #: The node's verdict: ``None`` until it has one, then whether the task may run.
    _tasksignal_admitted = None
    #: Whether the pool process stored the run's end in the result backend itself.
    _tasksignal_stored = False

    @property
    def store_errors(self) -> bool:
        """Celery's rule for storing an end that is not a success, unless already stored."""
        return not self._tasksignal_stored and super().store_errors

    def revoked(self) -> bool:
        """Celery's revoke check, then the node's: must this task be held back or skipped?"""
        if super().revoked():
            return True
        node = nodes.current()
        return node is not None and node.hold(self)

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """A run that did not succeed: a stopped one is a revoke, anything else Celery's."""
        node = nodes.current()
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if node is None or not self._tasksignal_admitted:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        if isinstance(exc, RunStopped):
            self._tasksignal_stored = exc.stored

            def announce() -> None:
                self.announce_cancelled(exc.reason)

            node.run_stopped(self, exc, announce)
            return None
        node.run_failed(self, safe_repr(exc))
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def announce_cancelled(self, reason: str) -> None:
        """Celery's announcement of a revoked task, for a run a cancel skipped or stopped,
        and the same end for what the run's message would have led to.

        The rest of a chain is never sent once a link is cancelled, and a chord can no
        longer run its body once a task of its header was. Left alone, the chain's result
        would stay ``PENDING`` for ever, and Celery would count this revoke and, when the
        last header task ended, store a ``ChordError`` FAILURE for the body, which a
        caller reads as a crash (celery #10526). Instead each of them is stored
        ``REVOKED`` now, so whoever waits on the workflow's result learns at once, and
        the revoke is not counted: the body is never sent. Their pending cancels (written
        by a cascade) are completed ``skipped``.
        """
        # celery-types leaves out Request's private members used here.
        context = self._context  # type: ignore[attr-defined]
        signatures = [*(context.chain or ()), *([context.chord] if context.chord else [])]
        never_sent = [
            task_id
            for sig in signatures
            for task_id in lineage.signature_ids(signature(sig, app=self.task.app))
        ]
        for task_id in never_sent:
            self.task.backend.mark_as_revoked(
                task_id, f"never sent: task {self.id} before it was {reason}"
            )
        node = nodes.current()
        if never_sent and node is not None:
            node.settle_never_sent(self.id, never_sent)
        context.chord = None
        self._announce_revoked(reason, False, None, False)  # type: ignore[attr-defined]
