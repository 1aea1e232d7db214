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


#: A queue longer than this is not read through to look for lost messages (too costly).
SCAN_LIMIT = 10_000


def held_messages(app: "Celery", queues: set[str]) -> dict[str, str] | None:
    """Where Redis holds the message of each task it holds one for: waiting in one of
    ``queues`` (at any priority) or delivered and not acknowledged yet. ``None`` for any
    other broker, or when a queue is longer than :data:`SCAN_LIMIT`.

    One transaction reads every queue and the unacknowledged set, so a message a worker
    takes meanwhile is seen in one place or the other, never in neither. A message is in
    neither only while a worker's ``BRPOP`` answer travels to it, and for good if that
    worker dies then: kombu records a delivery only once the answer arrived.
    """
    import redis as redis_client
    from kombu.utils.json import loads

    held: dict[str, str] = {}
    with app.connection_for_write() as connection:
        if connection.transport.driver_type != "redis":
            return None
        channel = connection.default_channel
        prefix = getattr(channel.client, "global_keyprefix", "")
        # kombu's client prefixes some commands and not others: use a plain one, prefix all.
        client = redis_client.Redis(connection_pool=channel.client.connection_pool)
        keys = {
            prefix + channel._q_for_pri(queue, priority): queue
            for queue in queues
            for priority in channel.priority_steps
        }
        if any(client.llen(key) > SCAN_LIMIT for key in keys):
            return None
        with client.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.hgetall(prefix + channel.qos.unacked_key)
            *lists, unacked = pipe.execute()
        for key, payloads in zip(keys, lists, strict=True):
            for payload in payloads:
                held[loads(payload).get("headers", {}).get("id")] = f"queued in {keys[key]}"
        for payload in unacked.values():
            held[loads(payload)[0].get("headers", {}).get("id")] = "delivered, unacknowledged"
    return held
