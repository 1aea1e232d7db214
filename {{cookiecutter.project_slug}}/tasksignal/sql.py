"""The statements tasksignal runs on hot paths, written once as SQL.

Each runs on every task a worker receives, every signal sent or every API request; as SQL
it costs a fraction of the CPU of the same query built by the ORM, which compiles it each
time. Table and column names come from the models, quoted; values are always parameters.
Every statement here is served by an index whatever the table holds: ``task_id`` is indexed,
and the partial unique index on pending signals serves ``NOT completed``, so a million
completed rows cost nothing.
"""

import functools

from django.db import connection

from tasksignal.registry import CANCEL_TASK


def _names(model) -> dict[str, str]:
    quote = connection.ops.quote_name
    names = {"table": quote(model._meta.db_table)}
    for field in model._meta.concrete_fields:
        names[field.name] = quote(field.column)
    return names


@functools.cache
def insert_signal() -> str:
    """Insert a pending signal unless one of its kind is pending, and announce it.

    Parameters: task_id, signal, message, requested_by_id, channel. Returns the new row's
    ``id, created, modified``, or no row when one was pending. ``pg_notify`` runs in the
    same statement, so the notice is sent exactly when (and if) the row commits.
    """
    from tasksignal.models import CeleryTaskSignal
    from tasksignal.notify import MAX_MESSAGE_IN_PAYLOAD

    n = _names(CeleryTaskSignal)
    return f"""
        WITH inserted AS (
            INSERT INTO {n["table"]} ({n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["requested_by"]}, {n["completed"]}, {n["outcome"]}, {n["error"]},
                {n["created"]}, {n["modified"]})
            VALUES (%s, %s, %s, %s, false, '', '', statement_timestamp(), statement_timestamp())
            ON CONFLICT ({n["task_id"]}, {n["signal"]}) WHERE NOT {n["completed"]} DO NOTHING
            RETURNING {n["id"]}, {n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["created"]}, {n["modified"]}
        )
        SELECT {n["id"]}, {n["created"]}, {n["modified"]},
            pg_notify(%s, json_build_object(
                'id', {n["id"]}, 'task_id', {n["task_id"]}, 'signal', {n["signal"]},
                'message', left({n["message"]}, {MAX_MESSAGE_IN_PAYLOAD}),
                'truncated', length({n["message"]}) > {MAX_MESSAGE_IN_PAYLOAD})::text)
        FROM inserted
    """  # noqa: S608 - quoted names from the model, values are parameters


@functools.cache
def signals_at_receipt() -> str:
    """What a worker must know about a task it is about to run: pending signals, and any
    cancel (pending or completed: a message delivered again after its cancel was honoured).

    Parameter: task_id. Rows: ``id, signal, message, completed, age`` (seconds since the
    signal was created, on the database clock).
    """
    from tasksignal.models import CeleryTaskSignal

    n = _names(CeleryTaskSignal)
    return f"""
        SELECT {n["id"]}, {n["signal"]}, {n["message"]}, {n["completed"]},
            EXTRACT(EPOCH FROM statement_timestamp() - {n["created"]})::float8
        FROM {n["table"]}
        WHERE {n["task_id"]} = %s AND (NOT {n["completed"]} OR {n["signal"]} = '{CANCEL_TASK}')
        ORDER BY {n["id"]}
    """  # noqa: S608


@functools.cache
def pending_signals_of() -> str:
    """Pending signals of a set of tasks (a node's tasks, at reconcile).

    Parameter: a list of task ids. Rows: ``id, task_id, signal, message, age``.
    """
    from tasksignal.models import CeleryTaskSignal

    n = _names(CeleryTaskSignal)
    return f"""
        SELECT {n["id"]}, {n["task_id"]}, {n["signal"]}, {n["message"]},
            EXTRACT(EPOCH FROM statement_timestamp() - {n["created"]})::float8
        FROM {n["table"]}
        WHERE {n["task_id"]} = ANY(%s) AND NOT {n["completed"]}
        ORDER BY {n["id"]}
    """  # noqa: S608


def _complete(by: str) -> str:
    """An UPDATE completing pending signals; ``by`` picks the rows: ``id`` (a list of ids),
    ``task`` (one task's pending cancel) or ``tasks`` (everything pending for a list)."""
    from tasksignal.models import CeleryTaskSignal

    n = _names(CeleryTaskSignal)
    where = {
        "id": f"{n['id']} = ANY(%s)",
        "task": f"{n['task_id']} = %s AND {n['signal']} = '{CANCEL_TASK}'",
        "tasks": f"{n['task_id']} = ANY(%s)",
    }[by]
    return f"""
        UPDATE {n["table"]} SET {n["completed"]} = true, {n["outcome"]} = %s,
            {n["error"]} = %s, {n["completed_at"]} = statement_timestamp(),
            {n["acknowledged_at"]} = COALESCE({n["acknowledged_at"]}, statement_timestamp()),
            {n["modified"]} = statement_timestamp()
        WHERE {where} AND NOT {n["completed"]}
        RETURNING {n["id"]}, {n["task_id"]}
    """  # noqa: S608


@functools.cache
def complete_signals() -> str:
    """Complete pending signals by id. Parameters: outcome, error, list of ids."""
    return _complete("id")


@functools.cache
def complete_cancel_of() -> str:
    """Complete a task's pending cancel. Parameters: outcome, error, task_id."""
    return _complete("task")


@functools.cache
def complete_pending_of() -> str:
    """Complete every pending signal of a set of tasks (they ended: ``too_late``).

    Parameters: outcome, error, list of task ids.
    """
    return _complete("tasks")
