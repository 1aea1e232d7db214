"""Exceptions raised by the signalling machinery."""

from celery.exceptions import Ignore
from django.core.exceptions import BadRequest

from tasksignal.states import Outcome


class TaskCancelled(BaseException):
    """Raised inside a task to stop it because a cancel signal arrived.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception:`` in task
    code cannot swallow it by accident. Catch it only to clean up, then re-raise.

    >>> str(TaskCancelled("abc", Outcome.COOPERATIVE, "user pressed stop"))
    'task abc cancelled (cooperative): user pressed stop'
    """

    def __init__(
        self, task_id: str = "", outcome: str = Outcome.INTERRUPTED, message: str = ""
    ) -> None:
        super().__init__(
            f"task {task_id} cancelled ({outcome})" + (f": {message}" if message else "")
        )
        self.task_id = task_id
        self.outcome = outcome
        self.message = message


class RunStopped(Ignore):
    """How a cancelled run ends: it tells the worker's main process how the cancel was met.

    Raised by ``SignalAwareTask`` after its cleanup, outside any ``except`` block, so that
    Celery's trace formats a two-frame traceback instead of the task's whole stack. As an
    ``Ignore`` the trace stores no result: the task has stored ``REVOKED`` itself
    (``stored``); the worker's main process then completes the signal, sends
    ``task-revoked`` and acknowledges the message (``request.py``).

    >>> stopped = RunStopped("abc", Outcome.COOPERATIVE, True)
    >>> stopped.outcome, stopped.reason, stopped.stored
    ('cooperative', 'cancelled (cooperative)', False)
    """

    def __init__(self, task_id: str, outcome: str, cleanup_ok: bool, stored: bool = False):
        # All go to Exception.args: the exception crosses the pool's pipe by pickle.
        super().__init__(task_id, outcome, cleanup_ok, stored)
        self.task_id = task_id
        self.outcome = outcome
        self.cleanup_ok = cleanup_ok
        #: Whether ``REVOKED`` is in the result backend already.
        self.stored = stored

    @property
    def reason(self) -> str:
        """The reason stored with ``REVOKED`` in the result backend."""
        return self.reason_for(self.outcome, self.cleanup_ok)

    @staticmethod
    def reason_for(outcome: str, cleanup_ok: bool) -> str:
        """The reason of a run stopped by rung ``outcome``, its cleanup done or not."""
        return f"cancelled ({outcome})" + ("" if cleanup_ok else ", cleanup failed")

    def __str__(self) -> str:
        return f"task {self.task_id} {self.reason}"


class UnknownSignal(BadRequest):
    """A signal name that is neither built in nor registered with ``register_signal``."""
