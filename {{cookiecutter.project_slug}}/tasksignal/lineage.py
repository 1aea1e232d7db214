"""Which tasks descend from which: what a cascade of signals follows.

Celery records only a task's ``root_id`` and ``parent_id``, and nothing of the tasks it
has not sent yet (the rest of a chain, a chord's body). So as each task is published
(Celery's ``before_task_publish``, in the producer: a web process, the shell, or the pool
process of a task starting another) tasksignal

* sets the ``tasksignal_lineage`` header (``states.LINEAGE_HEADER``): the ids the task
  descends from, oldest first: the lineage of the task publishing it and that task's id,
  Celery's ``root_id`` and ``parent_id``, and the group (or chord header) it belongs to;
* writes a :class:`~tasksignal.models.TaskLineage` row for it, and one for each task its
  message will lead to (the links of its chain, its chord's body), in one statement.

A cascade (``cascade.py``) finds every known descendant with one indexed query over
those rows; a worker node checks the header at admission, so that a task started after
the cascade, by a descendant still running, inherits the cancel::

    >>> from celery import Celery
    >>> app = Celery(set_as_current=False)
    >>> sig = app.signature("work", options={"task_id": "b"})
    >>> list(descendants_in({"chain": [sig], "chord": None}, ["root", "a"]))
    [('b', ['root', 'a'])]

The cost: one INSERT per published task that has a lineage; a task published outside
any task, group or chain has none and costs nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from celery import signature
from celery._state import get_current_task
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from tasksignal import sql
from tasksignal.states import LINEAGE_HEADER

logger = logging.getLogger(__name__)

#: Seconds a running task's send waits for PostgreSQL to take its lineage rows.
RECORD_PATIENCE = 20.0
#: Seconds between two tries of those rows.
RECORD_RETRY_INTERVAL = 0.5


def ancestors_of(request: Any) -> list[str]:
    """The lineage a worker's request carries (its header, else Celery's own ids).

    >>> class Request:
    ...     id, request_dict = "c", {"root_id": "a", "parent_id": "b"}
    >>> ancestors_of(Request())
    ['a', 'b']
    """
    headers = request.request_dict
    carried = headers.get(LINEAGE_HEADER)
    if carried is not None:
        return list(carried)
    return _unique(
        [headers.get("root_id"), headers.get("parent_id"), headers.get("group")], request.id
    )


def _unique(ids: Iterable[str | None], own_id: str | None) -> list[str]:
    seen: dict[str, None] = {}
    for an_id in ids:
        if an_id and an_id != own_id:
            seen.setdefault(an_id, None)
    return list(seen)


def lineage_of_published(headers: Mapping[str, Any]) -> list[str]:
    """The lineage of a task being published, from its headers and the running task."""
    ids: list[str | None] = []
    task = get_current_task()
    request = getattr(task, "request", None)
    if request is not None and request.id and not request.called_directly:
        ids += getattr(request, LINEAGE_HEADER, None) or []
        ids.append(request.id)
    ids += [headers.get("root_id"), headers.get("parent_id"), headers.get("group")]
    return _unique(ids, headers.get("id"))


def signature_ids(sig: Any) -> Iterator[str]:
    """The ids of the tasks a (frozen) signature will run: a group's or chord's too."""
    sig = signature(sig)
    kwargs = sig.get("kwargs") or {}
    for part in kwargs.get("tasks") or kwargs.get("header") or []:
        yield from signature_ids(part)
    if kwargs.get("body"):
        yield from signature_ids(kwargs["body"])
    task_id = sig.get("options", {}).get("task_id")
    if task_id:
        yield task_id


def descendants_in(
    embed: Mapping[str, Any], ancestors: list[str]
) -> Iterator[tuple[str, list[str]]]:
    """The tasks a message will lead to, each with its lineage: ``ancestors`` (the
    message's lineage and its own id) plus the chain links before it."""
    lineage = list(ancestors)
    for link in reversed(embed.get("chain") or []):  # Celery keeps the next link last
        link_ids = list(signature_ids(link))
        for link_id in link_ids:
            yield link_id, lineage
        lineage = [*lineage, *link_ids]
    if embed.get("chord"):
        for body_id in signature_ids(embed["chord"]):
            yield body_id, list(ancestors)


def on_publish(
    sender: str | None = None,
    body: Any = None,
    headers: dict[str, Any] | None = None,
    **kwargs: object,
) -> None:
    """``before_task_publish``: set the lineage header and record the task's lineage."""
    if headers is None or "id" not in headers:  # protocol 1: no headers to carry it
        return
    lineage = lineage_of_published(headers)
    headers[LINEAGE_HEADER] = lineage
    rows = [(headers["id"], lineage)] if lineage else []
    if isinstance(body, (tuple, list)) and len(body) == 3 and isinstance(body[2], Mapping):
        rows += descendants_in(body[2], [*lineage, headers["id"]])
    if rows:
        record(rows)


def record(rows: list[tuple[str, list[str]]]) -> None:
    """Write lineage rows, one statement; a task recorded before keeps its first row.

    Sent by a running task (a workflow sending its chord), the write waits out a
    PostgreSQL restart of up to :data:`RECORD_PATIENCE` seconds, as the send itself waits
    out a Redis restart (``config/celery.py``): without its rows, the API does not know the
    tasks until a node admits them. A write that still fails is logged, not raised, outside
    a transaction: the task is still published, and its header still lets a cascade reach
    it at admission.
    """
    give_up = time.monotonic() + (RECORD_PATIENCE if get_current_task() else 0.0)
    while True:
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.insert_lineage(), [json.dumps(rows)])
            return
        except DatabaseError as exc:
            if connection.in_atomic_block:
                raise
            if not isinstance(exc, OperationalError | InterfaceError) or (
                time.monotonic() >= give_up
            ):
                logger.warning("could not record the lineage of %s", rows[0][0], exc_info=True)
                return
        connection.close()  # the server went away: the next try connects again
        time.sleep(RECORD_RETRY_INTERVAL)


def connect() -> None:
    """Connect :func:`on_publish` to Celery's ``before_task_publish`` (``apps.ready``)."""
    from celery.signals import before_task_publish

    before_task_publish.connect(on_publish, dispatch_uid="tasksignal.lineage")
