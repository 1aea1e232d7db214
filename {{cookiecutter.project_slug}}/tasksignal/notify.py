"""Notifications over Redis pub/sub: the fast path that wakes the worker running a task.

A notification carries what the task needs to act (id, task, kind, message), so the
worker does not have to read the row back. Losing one delays a signal by at most the
reconcile interval: the database row stays the truth.
"""

import json
import logging
import os
import threading

import redis

from tasksignal import conf

logger = logging.getLogger(__name__)

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


def client() -> redis.Redis:
    """The Redis client of this process (a new one after fork: sockets are not shared)."""
    url = conf.get("TASKSIGNAL_REDIS_URL")
    key = (os.getpid(), url)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = redis.Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
            )
        return _clients[key]


def encode(row) -> str:
    """The notification payload for a signal row."""
    return json.dumps(
        {"id": row.pk, "task_id": row.task_id, "signal": row.signal, "message": row.message}
    )


def decode(data: bytes | str) -> dict:
    """Parse a payload made by :func:`encode`; raises ``ValueError`` on anything else."""
    payload = json.loads(data)
    if not isinstance(payload, dict) or not {"id", "task_id", "signal"} <= payload.keys():
        raise ValueError(f"not a tasksignal notification: {data!r}")
    payload.setdefault("message", "")
    return payload


def publish(row) -> None:
    """Notify the workers of ``row``; a Redis failure is logged, reconciliation delivers it."""
    try:
        client().publish(conf.get("TASKSIGNAL_CHANNEL"), encode(row))
    except redis.RedisError:
        logger.warning(
            "could not publish signal %s; workers will read it from the database", row.pk
        )
