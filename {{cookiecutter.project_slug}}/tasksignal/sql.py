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
def admit_task() -> str:
    """What a worker must know of a task it is about to run, and its skip if it is cancelled.

    Returns the task's pending signals and any cancel (pending, or completed: a message
    delivered again after its cancel was honoured), as rows ``id, signal, message,
    completed, age`` (seconds since the signal was created, on the database clock); in the
    same statement a pending cancel is completed ``skipped``. The task id is the ``{task_id}``
    placeholder, replaced by the id quoted as a literal (``psycopg.sql.quote``): the
    statement shares one round trip with the node's ``LISTEN``, which takes no parameters.
    """
    from tasksignal.models import CeleryTaskSignal
    from tasksignal.states import Outcome

    n = _names(CeleryTaskSignal)
    task = "{task_id}"
    return f"""
        WITH found AS (
            SELECT {n["id"]}, {n["signal"]}, {n["message"]}, {n["completed"]},
                EXTRACT(EPOCH FROM statement_timestamp() - {n["created"]})::float8 AS age
            FROM {n["table"]}
            WHERE {n["task_id"]} = {task}
                AND (NOT {n["completed"]} OR {n["signal"]} = '{CANCEL_TASK}')
        ), skipped AS (
            UPDATE {n["table"]} SET {n["completed"]} = true, {n["outcome"]} = '{Outcome.SKIPPED}',
                {n["completed_at"]} = statement_timestamp(),
                {n["acknowledged_at"]} = COALESCE({n["acknowledged_at"]}, statement_timestamp()),
                {n["modified"]} = statement_timestamp()
            WHERE {n["task_id"]} = {task} AND {n["signal"]} = '{CANCEL_TASK}'
                AND NOT {n["completed"]}
            RETURNING {n["id"]}
        )
        SELECT * FROM found ORDER BY 1
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
    """An UPDATE completing pending signals; ``by`` picks the rows: ``id`` (a list of ids) or
    ``cancels`` (the pending cancels of a list of tasks)."""
    from tasksignal.models import CeleryTaskSignal

    n = _names(CeleryTaskSignal)
    where = {
        "id": f"{n['id']} = ANY(%s)",
        "cancels": f"{n['task_id']} = ANY(%s) AND {n['signal']} = '{CANCEL_TASK}'",
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


def _run_names() -> dict[str, str]:
    from tasksignal.models import TaskRun

    return _names(TaskRun)


#: The columns a worker node writes into run records, with their PostgreSQL types.
RUN_COLUMNS = {
    "task_id": "text",
    "task_name": "text",
    "state": "text",
    "worker": "text",
    "pid": "integer",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "progress_current": "float8",
    "progress_total": "float8",
    "progress_message": "text",
    "error": "text",
}


def _unnest_runs(prefix: str = "") -> str:
    arrays = ", ".join(f"%({prefix}{name})s::{kind}[]" for name, kind in RUN_COLUMNS.items())
    return f"unnest({arrays}) AS r({', '.join(RUN_COLUMNS)})"


@functools.cache
def write_runs() -> str:
    """A worker node's batch of writes, in one statement: settle the signals of the runs that
    ended (``too_late``), create the run records that do not exist yet, update the others.

    Parameters, by name: ``ended`` (task ids); one list per column of :data:`RUN_COLUMNS`
    for every record (NULL: leave the column as it is), and the same prefixed ``new_`` for
    the records to create if missing. The final UPDATE does not see the rows the INSERT
    adds (one snapshot), which already hold their values.
    """
    from tasksignal.models import CeleryTaskSignal
    from tasksignal.states import Outcome

    n, s = _run_names(), _names(CeleryTaskSignal)
    columns = ", ".join(n[name] for name in RUN_COLUMNS)
    sets = ", ".join(
        f"{n[name]} = COALESCE(r.{name}, t.{n[name]})" for name in RUN_COLUMNS if name != "task_id"
    )
    return f"""
        WITH settled AS (
            UPDATE {s["table"]} SET {s["completed"]} = true, {s["outcome"]} = '{Outcome.TOO_LATE}',
                {s["completed_at"]} = statement_timestamp(),
                {s["acknowledged_at"]} = COALESCE({s["acknowledged_at"]}, statement_timestamp()),
                {s["modified"]} = statement_timestamp()
            WHERE {s["task_id"]} = ANY(%(ended)s::text[]) AND NOT {s["completed"]}
            RETURNING {s["id"]}
        ), created AS (
            INSERT INTO {n["table"]} ({columns}, {n["updated_at"]})
            SELECT r.task_id, r.task_name, COALESCE(r.state, 'running'), r.worker, r.pid,
                r.started_at, r.finished_at, r.progress_current, r.progress_total,
                COALESCE(r.progress_message, ''), COALESCE(r.error, ''), statement_timestamp()
            FROM {_unnest_runs("new_")}
            ON CONFLICT ({n["task_id"]}) DO NOTHING
            RETURNING {n["task_id"]}
        )
        UPDATE {n["table"]} AS t SET {sets}, {n["updated_at"]} = statement_timestamp()
        FROM {_unnest_runs()}
        WHERE t.{n["task_id"]} = r.task_id
    """  # noqa: S608


@functools.cache
def complete_cancels_of() -> str:
    """Complete the pending cancels of a list of tasks. Parameters: outcome, error, task ids."""
    return _complete("cancels")
