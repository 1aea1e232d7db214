"""Signals that reach a task and everything it started: chains, groups, chords, children.

``CeleryTaskSignal.objects.cancel(task_id, cascade=True)`` (``pause`` and ``resume`` the
same) writes the task's row marked ``cascade``, then one row for each task recorded as
its descendant (``lineage.py``), with one ``INSERT ... SELECT`` per :data:`BATCH_SIZE`
tasks, all in one transaction; each running descendant hears of it like of any signal
and stops by its own rung of the ladder, each queued one is skipped when it reaches a
worker. Descendants published later (by a descendant still running, or the next link of
a chain) carry the cancelled id in their lineage header: the worker node skips them at
admission, as if cancelled themselves.

How the shapes of Celery's canvas end:

* a **chain** stops at the cancelled link: Celery sends the next link only after a link
  succeeds, so the rest never runs;
* every member of a **group** stops;
* a **chord** whose header lost a task to a cancel never runs its body, and its body's
  result is ``REVOKED`` at once (``request.py``): whoever waits on the chord's result
  gets ``TaskRevokedError`` instead of waiting for ever or reading a ``ChordError``.

Canvas results cancel directly (the ids they hold, plus their descendants)::

    from tasksignal.cascade import cancel_result

    result = chord(group(job.s(i) for i in range(100)), summary.s()).delay()
    reach = cancel_result(result)      # the body, the header group and its 100 jobs
    reach.reached, reach.still_to_stop

What it costs: the root's row, one query for the descendants, one statement per batch of
descendants, whatever the depth of the tree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import current_app
from celery.result import ResultBase, ResultSet
from django.db import connections, transaction

from tasksignal import results, sql
from tasksignal.notify import signal_channel
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import Source

if TYPE_CHECKING:
    from tasksignal.models import CeleryTaskSignal, CeleryTaskSignalManager

logger = logging.getLogger(__name__)

#: Tasks signalled per statement.
BATCH_SIZE = 500


@dataclass(frozen=True)
class Reach:
    """How far a cascade went: the tasks it signalled, and how many of them were not
    finished (each has the signal pending now, and is still to stop)."""

    reached: int
    still_to_stop: int


def send_cascade(
    manager: CeleryTaskSignalManager,
    task_id: str,
    signal: str,
    message: str,
    requested_by: Any,
    finished: bool,
    source: str,
) -> CeleryTaskSignal:
    """Send ``signal`` to ``task_id`` and to every task recorded as its descendant; return
    the task's own row, with ``reached`` and ``still_to_stop`` set."""
    with transaction.atomic(using=manager.db):
        row = manager._send(task_id, signal, message, requested_by, finished, source, True)
        if not row.cascade:  # a plain one was pending: it now means the descendants too
            manager.filter(pk=row.pk).update(cascade=True)
            row.cascade = True
        reach = _signal_all(
            manager.db, descendants([task_id], manager.db), signal, message, requested_by, source
        )
    row.reached = 1 + reach.reached
    row.still_to_stop = (0 if row.completed else 1) + reach.still_to_stop
    return row


def descendants(task_ids: Iterable[str], using: str = "default") -> list[str]:
    """Every task recorded as descending from any of ``task_ids`` (one query)."""
    roots = list(task_ids)
    with connections[using].cursor() as cursor:
        cursor.execute(sql.descendants_of(), [roots])
        return [task_id for (task_id,) in cursor.fetchall() if task_id not in roots]


def _signal_all(
    using: str,
    task_ids: Iterable[str],
    signal: str,
    message: str,
    requested_by: Any,
    source: str,
    cascade: bool = True,
) -> Reach:
    task_ids = list(dict.fromkeys(task_ids))
    still_to_stop = 0
    with connections[using].cursor() as cursor:
        for start in range(0, len(task_ids), BATCH_SIZE):
            batch = task_ids[start : start + BATCH_SIZE]
            ended = _ended(batch)
            cursor.execute(
                sql.cascade_signals(),
                {
                    "task_ids": batch,
                    "channels": [signal_channel(task_id) for task_id in batch],
                    "ended": [task_id in ended for task_id in batch],
                    "signal": signal,
                    "message": message,
                    "requested_by": getattr(requested_by, "pk", requested_by),
                    "source": source,
                    "cascade": cascade,
                },
            )
            still_to_stop += cursor.fetchone()[0]
    return Reach(len(task_ids), still_to_stop)


def _ended(task_ids: list[str]) -> set[str]:
    """Which of ``task_ids`` the result backend holds as over: a task that succeeded
    between two of its node's record writes has no finished record to say so."""
    try:
        return set(results.ended_states(current_app.backend, task_ids))
    except Exception:  # the backend's errors vary with its kind: the rows say pending then
        logger.warning("could not ask the result backend which tasks ended", exc_info=True)
        return set()


def result_ids(result: ResultBase) -> list[str]:
    """The ids a Celery result object stands for: its own, its parents' (the earlier links
    of a chain, a chord's header) and, for a group, every member's.

    >>> from celery import Celery
    >>> from celery.result import AsyncResult, GroupResult
    >>> app = Celery(set_as_current=False)
    >>> header = GroupResult("g", [AsyncResult("a", app=app), AsyncResult("b", app=app)], app=app)
    >>> result_ids(AsyncResult("body", parent=header, app=app))
    ['body', 'g', 'a', 'b']
    """
    ids: list[str] = []
    pending: list[Any] = [result]
    while pending:
        item = pending.pop(0)
        if item is None:
            continue
        item_id = getattr(item, "id", None)
        if item_id in ids:
            continue
        if item_id:
            ids.append(item_id)
        if isinstance(item, ResultSet):
            pending.extend(item.results or ())
        pending.append(getattr(item, "parent", None))
    return ids


def send_to_all(
    task_ids: Iterable[str],
    signal: str,
    message: str = "",
    requested_by: Any = None,
    *,
    cascade: bool = True,
    source: str = Source.CODE,
    using: str = "default",
) -> Reach:
    """Send ``signal`` to each of ``task_ids`` and, with ``cascade``, to everything they
    started; say how far it reached. One transaction, one query for the descendants and
    one statement per :data:`BATCH_SIZE` tasks, however many there are."""
    roots = list(task_ids)
    with transaction.atomic(using=using):
        found = descendants(roots, using) if cascade and roots else []
        return _signal_all(using, roots + found, signal, message, requested_by, source, cascade)


def cancel_result(
    result: ResultBase,
    message: str = "",
    requested_by: Any = None,
    *,
    signal: str = CANCEL_TASK,
    **options: Any,
) -> Reach:
    """Cancel every task a Celery result object stands for (an ``AsyncResult``, a chain's,
    a ``GroupResult``, a chord's) and everything they started (unless ``cascade=False``);
    say how far it reached. ``signal`` sends a pause or a resume the same way;
    ``options`` are :func:`send_to_all`'s (``cascade``, ``source``, ``using``)::

        result = chord(group(job.s(i) for i in range(100)), summary.s()).delay()
        reach = cancel_result(result, message="user pressed stop")
        print(f"{reach.reached} tasks cancelled, {reach.still_to_stop} still stopping")
    """
    return send_to_all(result_ids(result), signal, message, requested_by, **options)
