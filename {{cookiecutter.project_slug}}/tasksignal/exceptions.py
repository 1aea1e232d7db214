"""Exceptions raised by the signalling machinery."""

from django.core.exceptions import BadRequest


class TaskCancelled(BaseException):
    """Raised inside a task to stop it because a cancel signal arrived.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception:`` in task
    code cannot swallow it by accident. Catch it only to clean up, then re-raise.
    """

    def __init__(self, task_id: str = "", outcome: str = "interrupted", message: str = "") -> None:
        super().__init__(
            f"task {task_id} cancelled ({outcome})" + (f": {message}" if message else "")
        )
        self.task_id = task_id
        self.outcome = outcome
        self.message = message


class UnknownSignal(BadRequest):
    """A signal name that is neither built in nor registered with ``register_signal``."""
