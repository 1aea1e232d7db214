"""Notifications over PostgreSQL ``LISTEN``/``NOTIFY``: the fast path that wakes a worker node.

Sending a signal inserts its row and calls ``pg_notify`` in the same statement, so the
notification is delivered exactly when the row commits (never before, never for a rolled
back row, never lost because the sender died after its commit). Each task has a channel of
its own, and a worker node listens only on the channels of the tasks it holds: a notice
reaches the one node that runs the task, or nobody. A notification carries what the task
needs to act (id, kind, message), so the node need not read the row back; the row stays the
truth, and the node also reads pending signals for its tasks every
``TASKSIGNAL_RECONCILE_INTERVAL`` (covering the time it was disconnected).

>>> channel = signal_channel("d0e1f2")
>>> channel.startswith("ts_") and len(channel) <= 63
True
>>> decode('{"id": 7, "task_id": "d0e1f2", "signal": "cancel_task"}')["message"]
''
"""

import hashlib
import json

from tasksignal import conf

#: PostgreSQL truncates channel names to 63 bytes and a payload must stay under 8000.
MAX_MESSAGE_IN_PAYLOAD = 4000


def signal_channel(task_id: str) -> str:
    """The channel on which signals for ``task_id`` are announced.

    A hash, so that any task id fits PostgreSQL's identifier length; salted with
    ``TASKSIGNAL_CHANNEL`` so that services sharing a database never hear each other.
    """
    salted = f"{conf.get('TASKSIGNAL_CHANNEL')}\0{task_id}".encode()
    return f"ts_{hashlib.blake2b(salted, digest_size=20).hexdigest()}"


def decode(data: str) -> dict:
    """Parse a notification payload; raises ``ValueError`` on anything else.

    Payloads are built by the ``send`` statement (``sql.py``); a message longer than
    :data:`MAX_MESSAGE_IN_PAYLOAD` arrives cut, with ``truncated`` set.
    """
    payload = json.loads(data)
    if not isinstance(payload, dict) or not {"id", "task_id", "signal"} <= payload.keys():
        raise ValueError(f"not a tasksignal notification: {data!r}")
    payload.setdefault("message", "")
    return payload
