"""Guards for Celery's Redis transport (kombu) that a worker node puts in place as it starts.

When Redis goes away, Celery's consumer closes its broker connection and opens a new one.

Closed channels. Two things still use a channel of the closed connection afterwards:
kombu, while closing it, tries to put back the messages it delivered and that are not
acknowledged yet; and a task that was running when Redis went away acknowledges its
message on that channel when it ends. Either builds a Redis client from the closed
connection and fails with an ``AttributeError`` (``'NoneType' object has no attribute
'hostname'`` or ``'client'``), which Celery treats as unrecoverable: the whole worker
exits on a Redis restart (seen in ``make chaos``; the same failure as celery/kombu#582 and
#970). The guard makes that case a connection error, which kombu and Celery already
handle: the close goes on, the acknowledgement is logged as failed. Nothing is lost: those
messages stay in the transport's unacknowledged set in Redis and come back once the
visibility timeout passes; a task that comes back after it was cancelled is skipped at
admission.

Stranded messages. kombu takes a message from its queue (``BRPOP``) and then records it
as unacknowledged (``HSET``): two commands. When Redis stops between the two, the message
is in neither place, and only in this process, which drops it with the connection: a task
the API accepted never runs (celery/kombu#305 and #593 report such losses; ``make chaos``
caught one). The guard keeps such a message and puts it back at the head of its queue
from the next channel this process opens, once Redis is back, unless its record did
reach Redis (then kombu's own restore brings it back).

>>> guard_redis_transport()
>>> guard_redis_transport()  # idempotent
>>> from kombu.transport import redis
>>> redis.Channel._connparams.tasksignal_guard, redis.QoS.append.tasksignal_guard
(True, True)
"""

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: Messages taken from Redis that could not be recorded as unacknowledged, each as
#: ``(delivery tag, payload, exchange, routing key)``, until a channel puts them back.
_stranded: list[tuple[str, Any, str, str]] = []
_stranded_lock = threading.Lock()


def guard_redis_transport() -> None:
    """Make a Redis channel of a closed connection raise a connection error, not crash;
    keep a message stranded between its ``BRPOP`` and its ``HSET`` and put it back."""
    import redis as redis_client
    from kombu.transport import redis

    connparams, append, init = redis.Channel._connparams, redis.QoS.append, redis.Channel.__init__
    if getattr(connparams, "tasksignal_guard", False):
        return

    @functools.wraps(connparams)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis_client.ConnectionError("this channel's broker connection is closed")
        return connparams(self, *args, **kwargs)

    @functools.wraps(append)
    def append_or_keep(self: Any, message: Any, delivery_tag: str) -> None:
        try:
            append(self, message, delivery_tag)
        except self.channel.connection_errors:
            delivery = message.delivery_info
            with _stranded_lock:
                _stranded.append(
                    (delivery_tag, message._raw, delivery["exchange"], delivery["routing_key"])
                )
            raise

    @functools.wraps(init)
    def init_and_put_back(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _stranded:
            _put_back_stranded(self)

    guarded.tasksignal_guard = True
    append_or_keep.tasksignal_guard = True
    redis.Channel._connparams = guarded
    redis.QoS.append = append_or_keep  # type: ignore[method-assign]
    redis.Channel.__init__ = init_and_put_back  # type: ignore[method-assign]


def _put_back_stranded(channel: Any) -> None:
    """Push the stranded messages back to the head of their queues from ``channel`` (just
    connected); a message whose unacknowledged record reached Redis is left to kombu."""
    with _stranded_lock:
        held, _stranded[:] = list(_stranded), []
    try:
        with channel.conn_or_acquire() as client:
            recorded = client.pipeline()
            for tag, *_message in held:  # HGET: kombu's client prefixes it, not HEXISTS
                recorded.hget(channel.unacked_key, tag)
            lost = [
                message
                for message, known in zip(held, recorded.execute(), strict=True)
                if known is None
            ]
            pipe = client.pipeline()
            for _tag, payload, exchange, routing_key in lost:
                channel._do_restore_message(payload, exchange, routing_key, pipe, True)
            pipe.execute()
    except channel.connection_errors:
        with _stranded_lock:
            _stranded[:0] = held  # still away: the next channel tries again
        return
    logger.warning("put back %d messages Redis handed over as it went away", len(lost))


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
