"""Notifications over PostgreSQL ``LISTEN``/``NOTIFY``: what wakes a worker node and a waiter.

Sending a signal inserts its row and calls ``pg_notify`` in the same statement, so the
notification is delivered exactly when the row commits (never before, never for a rolled
back row, never lost because the sender died after its commit). Each task has a channel of
its own, and a worker node listens only on the channels of the tasks it holds: a notice
reaches the one node that runs the task, or nobody. A notification carries what the task
needs to act (id, kind, message), so the node need not read the row back; the row stays the
truth, and the node also reads pending signals for its tasks every
``TASKSIGNAL_RECONCILE_INTERVAL`` (covering the time it was disconnected).

The other way round, every statement that completes a signal or ends a run announces it
on the service's :func:`done_channel`, for the API's clients that wait for a stop
(``waiting.py``).

>>> channel = signal_channel("d0e1f2")
>>> channel.startswith("ts_") and len(channel) <= 63
True
>>> decode('{"id": 7, "task_id": "d0e1f2", "signal": "cancel_task"}')["message"]
''
"""

import hashlib
import json
from typing import Any

from tasksignal import conf

#: PostgreSQL truncates channel names to 63 bytes and a payload must stay under 8000.
MAX_MESSAGE_IN_PAYLOAD = 4000


def _channel(name: str) -> str:
    salted = f"{conf.get('TASKSIGNAL_CHANNEL')}\0{name}".encode()
    return f"ts_{hashlib.blake2b(salted, digest_size=20).hexdigest()}"


def done_channel() -> str:
    """The channel on which the service announces what is done: each signal completed (its
    outcome and latency) and each run that ended. The API's waiters listen to it."""
    return _channel("\0done")


def signal_channel(task_id: str) -> str:
    """The channel on which signals for ``task_id`` are announced.

    A hash, so that any task id fits PostgreSQL's identifier length; salted with
    ``TASKSIGNAL_CHANNEL`` so that services sharing a database never hear each other.
    """
    return _channel(task_id)


def decode(data: str) -> dict[str, Any]:
    """Parse a notification payload; raises ``ValueError`` on anything else.

    Payloads are built by the ``send`` statement (``sql.py``); a message longer than
    :data:`MAX_MESSAGE_IN_PAYLOAD` arrives cut, with ``truncated`` set.
    """
    payload = json.loads(data)
    if not isinstance(payload, dict) or not {"id", "task_id", "signal"} <= payload.keys():
        raise ValueError(f"not a tasksignal notification: {data!r}")
    payload.setdefault("message", "")
    return payload
