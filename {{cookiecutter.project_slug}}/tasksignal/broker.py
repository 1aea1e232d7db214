"""A guard for Celery's Redis transport (kombu) that a worker node puts in place as it starts.

When Redis goes away, Celery's consumer closes its broker connection and opens a new one.
Two things still use a channel of the closed connection afterwards: kombu, while closing
it, tries to put back the messages it delivered and that are not acknowledged yet; and a
task that was running when Redis went away acknowledges its message on that channel when
it ends. Either builds a Redis client from the closed connection and fails with an
``AttributeError`` (``'NoneType' object has no attribute 'hostname'`` or ``'client'``),
which Celery treats as unrecoverable: the whole worker exits on a Redis restart (seen in
``make chaos``; the same failure as celery/kombu#582 and #970).

The guard makes that case a connection error, which kombu and Celery already handle: the
close goes on, the acknowledgement is logged as failed. Nothing is lost: those messages
stay in the transport's unacknowledged set in Redis and come back once the visibility
timeout passes; a task that comes back after it was cancelled is skipped at admission.

>>> guard_closed_channels()
>>> guard_closed_channels()  # idempotent
>>> from kombu.transport import redis
>>> redis.Channel._connparams.tasksignal_guard
True
"""

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery


def guard_closed_channels() -> None:
    """Make a Redis channel of a closed connection raise a connection error, not crash."""
    import redis as redis_client
    from kombu.transport import redis

    connparams = redis.Channel._connparams
    if getattr(connparams, "tasksignal_guard", False):
        return

    @functools.wraps(connparams)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis_client.ConnectionError("this channel's broker connection is closed")
        return connparams(self, *args, **kwargs)

    guarded.tasksignal_guard = True
    redis.Channel._connparams = guarded


def restore_unacknowledged(app: "Celery", task_ids: set[str]) -> int:
    """Give the unacknowledged Redis messages of ``task_ids`` back to their queues now;
    return how many. For any other broker, or none to restore, do nothing (0).

    A worker that is killed leaves the messages of its running tasks unacknowledged in
    Redis (``acks_late``), where kombu restores them only once the visibility timeout has
    passed, and then at most ten every 100 seconds. A node that restarts knows which runs
    its earlier life left running (``sql.recover_orphans``); giving their messages back at
    once is what makes them run again within seconds. Messages of other tasks, which live
    workers may be running, are left alone.
    """
    if not task_ids:
        return 0
    from kombu.utils.json import loads

    restored = 0
    with app.connection_for_write() as connection:
        if connection.transport.driver_type != "redis":
            return 0
        channel = connection.default_channel
        qos, client = channel.qos, channel.client
        # kombu's key-prefixing client prefixes only the commands it uses itself.
        unacked = getattr(client, "global_keyprefix", "") + qos.unacked_key
        for tag, payload in client.hgetall(unacked).items():
            message = loads(payload)[0]
            if message.get("headers", {}).get("id") in task_ids:
                qos.restore_by_tag(tag, client)
                restored += 1
    return restored
