"""What Celery's result backend knows of runs whose records a worker node never finished.

A node writes run records in batches (``node.RECORD_FLUSH_INTERVAL``); one killed between a
task's end and the next batch leaves that run recorded ``queued`` or ``running`` though
Celery stored its result. The result backend is then the only witness of how it ended: a
restarting node (``Node._recover_orphans``) and the periodic sweep ask it, many tasks at a
time, and end those records.
"""

from collections.abc import Iterable
from typing import Any

from celery.backends.base import BaseKeyValueStoreBackend

from tasksignal.states import RunState

#: Tasks asked for in one round trip to a key-value backend (Redis ``MGET``).
BATCH_SIZE = 1000


def ended_states(backend: Any, task_ids: Iterable[str]) -> dict[str, str]:
    """The run state (a ``RunState``) of each of ``task_ids`` that the result backend holds
    as over (``SUCCESS``, ``FAILURE``, ``REVOKED``); tasks pending, running or unknown to
    it are left out. A key-value backend (Redis) answers in one ``MGET`` per
    :data:`BATCH_SIZE` tasks; others one task at a time.

    >>> from celery import Celery
    >>> backend = Celery(backend="cache+memory://").backend
    >>> backend.store_result("over", 42, "SUCCESS")
    42
    >>> backend.store_result("busy", None, "STARTED")
    >>> ended_states(backend, ["over", "busy", "never-seen"])
    {'over': 'succeeded'}
    """
    task_ids = list(task_ids)
    ended: dict[str, str] = {}
    # Redis's backend is not a KeyValueStoreBackend (that one adds the synchronous result
    # consumer Redis replaces); both share BaseKeyValueStoreBackend, which has mget().
    if not isinstance(backend, BaseKeyValueStoreBackend):
        for task_id in task_ids:
            state = RunState.OF_CELERY_STATE.get(backend.get_state(task_id))
            if state is not None:
                ended[task_id] = state
        return ended
    for start in range(0, len(task_ids), BATCH_SIZE):
        batch = task_ids[start : start + BATCH_SIZE]
        keys = [backend.get_key_for_task(task_id) for task_id in batch]
        values = backend.mget(keys)
        if hasattr(values, "get"):  # the cache backends answer with a mapping
            values = [values.get(key) for key in keys]
        for task_id, value in zip(batch, values, strict=True):
            if value is None:
                continue
            state = RunState.OF_CELERY_STATE.get(backend.decode_result(value)["status"])
            if state is not None:
                ended[task_id] = state
    return ended
