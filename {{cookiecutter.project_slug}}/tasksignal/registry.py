"""Signal kinds: the three built in, and those a project registers for itself.

A project adds a kind without touching this app or writing a migration::

    # myapp/apps.py, in AppConfig.ready()
    from tasksignal.registry import register_signal

    def set_batch_size(task, signal):
        task.run_state["batch_size"] = int(signal.message)

    register_signal("set_batch_size", set_batch_size, label="Set batch size")

The handler runs inside the task, at its next ``checkpoint()``, with the bound task and
the :class:`~tasksignal.models.CeleryTaskSignal` row (read ``signal.message``). The model
field takes its choices from :func:`signal_choices`, a callable, so new kinds need no
migration.
"""

from collections.abc import Callable
from dataclasses import dataclass

from tasksignal.exceptions import UnknownSignal

CANCEL_TASK = "cancel_task"
PAUSE_TASK = "pause_task"
RESUME_TASK = "resume_task"

Handler = Callable[..., object]


@dataclass(frozen=True)
class SignalKind:
    """A named signal; ``handler`` is ``None`` for the built-in kinds the runtime handles."""

    name: str
    label: str
    handler: Handler | None = None


_kinds: dict[str, SignalKind] = {
    CANCEL_TASK: SignalKind(CANCEL_TASK, "Cancel task"),
    PAUSE_TASK: SignalKind(PAUSE_TASK, "Pause task"),
    RESUME_TASK: SignalKind(RESUME_TASK, "Resume task"),
}


def register_signal(name: str, handler: Handler, *, label: str = "") -> SignalKind:
    """Register a signal kind whose ``handler(task, signal)`` runs at the task's checkpoint.

    Registering the same name twice with another handler is an error: two apps would
    otherwise silently fight over one signal.
    """
    if not name or len(name) > 32 or not name.replace("_", "").isalnum():
        raise ValueError(f"signal name {name!r} must be 1-32 letters, digits or underscores")
    kind = SignalKind(name, label or name.replace("_", " ").capitalize(), handler)
    existing = _kinds.get(name)
    if existing is not None and existing != kind:
        raise ValueError(f"signal {name!r} is already registered")
    _kinds[name] = kind
    return kind


def get_signal_kind(name: str) -> SignalKind:
    """Return the kind called ``name``; raise :class:`UnknownSignal` if there is none."""
    try:
        return _kinds[name]
    except KeyError:
        known = ", ".join(sorted(_kinds))
        raise UnknownSignal(f"unknown signal {name!r}; known signals: {known}") from None


def signal_choices() -> list[tuple[str, str]]:
    """Choices for the model field: every kind registered so far."""
    return [(kind.name, kind.label) for kind in _kinds.values()]
