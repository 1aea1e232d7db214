"""The statements tasksignal runs on hot paths, written once as SQL.

Each runs on every task a worker receives, every signal sent or every API request; as SQL
it costs a fraction of the CPU of the same query built by the ORM, which compiles it each
time. Table and column names come from the models, quoted; values are always parameters
(or, where a statement shares a round trip with a ``LISTEN``, literals quoted by psycopg).
Every statement is served by an index whatever the table holds: ``task_id`` is indexed,
and the partial unique index on pending signals serves ``NOT completed``, so a million
completed rows cost nothing.

Statements that complete signals or end runs also ``pg_notify`` the service's *done*
channel (``notify.done_channel()``), in the same statement: whoever waits for a stop (the
API's ``wait``) hears of it exactly when it commits.
"""

import functools

from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.models import Model

from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK
from tasksignal.states import Outcome, RunState


def _names(model: type[Model]) -> dict[str, str]:
    quote = connection.ops.quote_name
    names = {"table": quote(model._meta.db_table)}
    for field in model._meta.concrete_fields:
        if field.column is not None:
            names[field.name] = quote(field.column)
    return names


def _signal_names() -> dict[str, str]:
    from tasksignal.models import CeleryTaskSignal

    return _names(CeleryTaskSignal)


def _run_names() -> dict[str, str]:
    from tasksignal.models import TaskRun

    return _names(TaskRun)


def _done_notice(rows: str, done_channel: str) -> str:
    """A SELECT that announces each completed signal of ``rows`` on the done channel."""
    return f"""
        SELECT count(pg_notify({done_channel}, json_build_object(
            'task_id', task_id, 'id', id, 'signal', signal, 'outcome', outcome,
            'created', created, 'completed_at', completed_at,
            'latency_ms', round((EXTRACT(EPOCH FROM completed_at - created) * 1000)::numeric, 3)
        )::text)) FROM {rows}
    """  # noqa: S608


def _completed_columns(n: dict[str, str]) -> str:
    return (
        f"{n['id']} AS id, {n['task_id']} AS task_id, {n['signal']} AS signal, "
        f"{n['outcome']} AS outcome, {n['created']} AS created, "
        f"{n['completed_at']} AS completed_at"
    )


def _completion(n: dict[str, str], outcome: str, error: str) -> str:
    return f"""
        {n["completed"]} = true, {n["outcome"]} = {outcome}, {n["error"]} = {error},
        {n["completed_at"]} = statement_timestamp(),
        {n["acknowledged_at"]} = COALESCE({n["acknowledged_at"]}, statement_timestamp()),
        {n["modified"]} = statement_timestamp()
    """


@functools.cache
def insert_signal() -> str:
    """Insert a signal unless one of its kind is pending, and announce it.

    Parameters by name: ``task_id``, ``signal``, ``message``, ``requested_by``, ``source``
    (a ``states.Source``), ``cascade`` (meant for its descendants too), ``channel`` (the
    task's signal channel) and ``too_late`` (true: the task has finished, so the row is
    written completed ``too_late`` and nobody is told). Returns the new row's ``id,
    created, modified, completed, completed_at``, or no row when one was pending.
    ``pg_notify`` runs in the same statement, so the notice is sent exactly when (and if)
    the row commits.
    """
    from tasksignal.notify import MAX_MESSAGE_IN_PAYLOAD

    n = _signal_names()
    return f"""
        WITH inserted AS (
            INSERT INTO {n["table"]} ({n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["requested_by"]}, {n["source"]}, {n["cascade"]}, {n["completed"]},
                {n["outcome"]}, {n["error"]}, {n["created"]}, {n["modified"]},
                {n["acknowledged_at"]}, {n["completed_at"]})
            SELECT %(task_id)s, %(signal)s, %(message)s, %(requested_by)s, %(source)s,
                %(cascade)s, %(too_late)s,
                CASE WHEN %(too_late)s THEN '{Outcome.TOO_LATE}' ELSE '' END, '',
                statement_timestamp(), statement_timestamp(),
                CASE WHEN %(too_late)s THEN statement_timestamp() END,
                CASE WHEN %(too_late)s THEN statement_timestamp() END
            ON CONFLICT ({n["task_id"]}, {n["signal"]}) WHERE NOT {n["completed"]} DO NOTHING
            RETURNING {n["id"]}, {n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["created"]}, {n["modified"]}, {n["completed"]}, {n["completed_at"]}
        )
        SELECT {n["id"]}, {n["created"]}, {n["modified"]}, {n["completed"]}, {n["completed_at"]},
            CASE WHEN NOT {n["completed"]} THEN pg_notify(%(channel)s, json_build_object(
                'id', {n["id"]}, 'task_id', {n["task_id"]}, 'signal', {n["signal"]},
                'message', left({n["message"]}, {MAX_MESSAGE_IN_PAYLOAD}),
                'truncated', length({n["message"]}) > {MAX_MESSAGE_IN_PAYLOAD})::text) END
        FROM inserted
    """  # noqa: S608


@functools.cache
def admit_task() -> str:
    """What a worker must know of a task it is about to run, and its skip if it is cancelled.

    Returns the task's pending signals and any cancel (pending, or completed: a message
    delivered again after its cancel was honoured), as rows ``id, signal, message,
    completed, age`` (seconds since the signal was created, on the database clock); in the
    same statement a pending cancel is completed ``skipped`` and announced as done. A task
    with no cancel of its own whose lineage (``{ancestors}``, a ``text[]``) holds a task
    cancelled with ``cascade`` inherits that cancel: a row completed ``skipped`` is written
    for it, announced and returned. Likewise, when the latest cascade pause or resume of its
    ancestors is a pause, a pending pause is written for it and returned: it starts paused.
    Parameters: ``task_id``, ``ancestors`` (a list) and ``done_channel``. It runs once per
    task, so the node prepares it (planning it costs ten times what running it does) and
    sends it in one pipeline with its ``LISTEN``: one round trip.
    """
    n = _signal_names()
    task, ancestors = "%(task_id)s", "%(ancestors)s::text[]"
    now = "statement_timestamp()"
    return f"""
        WITH found AS (
            SELECT {n["id"]}, {n["signal"]}, {n["message"]}, {n["completed"]},
                EXTRACT(EPOCH FROM statement_timestamp() - {n["created"]})::float8 AS age
            FROM {n["table"]}
            WHERE {n["task_id"]} = {task}
                AND (NOT {n["completed"]} OR {n["signal"]} = '{CANCEL_TASK}')
        ), skipped AS (
            UPDATE {n["table"]} SET {_completion(n, f"'{Outcome.SKIPPED}'", "''")}
            WHERE {n["task_id"]} = {task} AND {n["signal"]} = '{CANCEL_TASK}'
                AND NOT {n["completed"]}
            RETURNING {_completed_columns(n)}
        ), inherited AS (
            INSERT INTO {n["table"]} ({n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["requested_by"]}, {n["source"]}, {n["cascade"]}, {n["completed"]},
                {n["outcome"]}, {n["error"]}, {n["created"]}, {n["modified"]},
                {n["acknowledged_at"]}, {n["completed_at"]})
            SELECT {task}, '{CANCEL_TASK}', a.{n["message"]}, a.{n["requested_by"]},
                a.{n["source"]}, true, true, '{Outcome.SKIPPED}', '', {now}, {now}, {now}, {now}
            FROM (
                SELECT {n["message"]}, {n["requested_by"]}, {n["source"]} FROM {n["table"]}
                WHERE {n["task_id"]} = ANY({ancestors}) AND {n["signal"]} = '{CANCEL_TASK}'
                    AND {n["cascade"]}
                ORDER BY {n["id"]} LIMIT 1
            ) AS a
            WHERE NOT EXISTS (
                SELECT 1 FROM {n["table"]} WHERE {n["task_id"]} = {task}
                    AND {n["signal"]} = '{CANCEL_TASK}'
            )
            RETURNING {_completed_columns(n)}, {n["message"]} AS message
        ), paused AS (
            INSERT INTO {n["table"]} ({n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["requested_by"]}, {n["source"]}, {n["cascade"]}, {n["completed"]},
                {n["outcome"]}, {n["error"]}, {n["created"]}, {n["modified"]})
            SELECT {task}, '{PAUSE_TASK}', a.{n["message"]}, a.{n["requested_by"]},
                a.{n["source"]}, true, false, '', '', {now}, {now}
            FROM (
                SELECT {n["signal"]}, {n["message"]}, {n["requested_by"]}, {n["source"]}
                FROM {n["table"]}
                WHERE {n["task_id"]} = ANY({ancestors}) AND {n["cascade"]}
                    AND {n["signal"]} IN ('{PAUSE_TASK}', '{RESUME_TASK}')
                ORDER BY {n["id"]} DESC LIMIT 1
            ) AS a
            WHERE a.{n["signal"]} = '{PAUSE_TASK}'
            ON CONFLICT ({n["task_id"]}, {n["signal"]}) WHERE NOT {n["completed"]} DO NOTHING
            RETURNING {n["id"]} AS id, {n["signal"]} AS signal, {n["message"]} AS message
        ), done AS (
            SELECT * FROM skipped
            UNION ALL SELECT id, task_id, signal, outcome, created, completed_at FROM inherited
        ), told AS ({_done_notice("done", "%(done_channel)s")})
        SELECT r.* FROM told, (
            SELECT * FROM found
            UNION ALL SELECT id, signal, message, true, 0.0::float8 FROM inherited
            UNION ALL SELECT id, signal, message, false, 0.0::float8 FROM paused
        ) AS r ORDER BY 1
    """  # noqa: S608


@functools.cache
def recover_orphans() -> str:
    """What a worker node does as it starts: settle the runs its earlier life left behind.

    A node that was killed leaves its runs recorded ``running`` (or ``paused``) under its
    name, though no process runs them any more. Each one with a pending cancel was stopped
    by the crash: the run ends ``cancelled`` and the cancel is completed ``killed`` (and
    announced), so its sender learns at once, and the broker's redelivery of the message
    is skipped at admission (a completed cancel counts). One whose cancel was completed
    before the crash (the run's own record of its stop was not written yet) ends
    ``cancelled`` too. Every other one goes back to ``queued``: its message comes back when
    the broker's visibility timeout expires (or at once: ``broker.restore_unacknowledged``).

    Nothing is touched while another session with the node's ``application`` name is
    connected: a second worker started under the same node name (Celery warns of it), or
    the frozen earlier life itself, still runs them.

    Parameters by name: ``worker`` (the node's name), ``application`` (its sessions'
    ``application_name``), ``done_channel``. One row: the task ids of the runs requeued
    (or NULL) and the number of cancels completed.
    """
    n, s = _run_names(), _signal_names()
    cancelled, queued = RunState.CANCELLED, RunState.QUEUED
    stopped = ", ".join(f"'{outcome}'" for outcome in Outcome.STOPPED)
    return f"""
        WITH orphans AS (
            SELECT t.{n["task_id"]} AS task_id, EXISTS (
                SELECT 1 FROM {s["table"]} c WHERE c.{s["task_id"]} = t.{n["task_id"]}
                    AND c.{s["signal"]} = '{CANCEL_TASK}' AND NOT c.{s["completed"]}
            ) AS cancelled, EXISTS (
                SELECT 1 FROM {s["table"]} c WHERE c.{s["task_id"]} = t.{n["task_id"]}
                    AND c.{s["signal"]} = '{CANCEL_TASK}' AND c.{s["completed"]}
                    AND c.{s["outcome"]} IN ({stopped})
            ) AS stopped
            FROM {n["table"]} t
            WHERE t.{n["worker"]} = %(worker)s
                AND t.{n["state"]} IN ('{RunState.RUNNING}', '{RunState.PAUSED}')
                AND NOT EXISTS (
                    SELECT 1 FROM pg_stat_activity WHERE application_name = %(application)s
                        AND pid <> pg_backend_pid()
                )
            FOR UPDATE OF t
        ), settled AS (
            UPDATE {n["table"]} AS t SET
                {n["state"]} = CASE WHEN o.cancelled OR o.stopped THEN '{cancelled}'
                    ELSE '{queued}' END,
                {n["finished_at"]} = CASE WHEN o.cancelled OR o.stopped
                    THEN statement_timestamp() END,
                {n["pid"]} = NULL,
                {n["error"]} = CASE WHEN o.cancelled OR o.stopped THEN ''
                    ELSE 'its worker node stopped while it ran; the broker delivers it again' END,
                {n["updated_at"]} = statement_timestamp()
            FROM orphans o WHERE t.{n["task_id"]} = o.task_id
            RETURNING t.{n["task_id"]} AS task_id, o.cancelled OR o.stopped AS cancelled
        ), killed AS (
            UPDATE {s["table"]} SET {_completion(s, f"'{Outcome.KILLED}'", "'its node died'")}
            WHERE {s["task_id"]} IN (SELECT task_id FROM settled WHERE cancelled)
                AND {s["signal"]} = '{CANCEL_TASK}' AND NOT {s["completed"]}
            RETURNING {_completed_columns(s)}
        )
        SELECT (SELECT array_agg(task_id) FROM settled WHERE NOT cancelled),
            (SELECT count(*) FROM killed),
            ({_done_notice("killed", "%(done_channel)s")}),
            (SELECT count(pg_notify(%(done_channel)s,
                json_build_object('task_id', task_id, 'ended', true)::text))
             FROM settled WHERE cancelled)
    """  # noqa: S608


@functools.cache
def unfinished_runs() -> str:
    """The runs recorded ``queued``, ``running`` or ``paused``, newest first, each with its
    state, whether it has a pending cancel, its task's name and the seconds since its record
    changed: what a node checks as it starts (the result backend may know that some are
    over; the broker may have lost some). Parameter by name: ``limit``."""
    n, s = _run_names(), _signal_names()
    states = ", ".join(f"'{state}'" for state in (RunState.QUEUED, *RunState.LIVE))
    return f"""
        SELECT t.{n["task_id"]}, t.{n["state"]}, EXISTS (
            SELECT 1 FROM {s["table"]} c WHERE c.{s["task_id"]} = t.{n["task_id"]}
                AND c.{s["signal"]} = '{CANCEL_TASK}' AND NOT c.{s["completed"]}
        ), t.{n["task_name"]},
            EXTRACT(EPOCH FROM statement_timestamp() - t.{n["updated_at"]})::float8
        FROM {n["table"]} t WHERE t.{n["state"]} IN ({states})
        ORDER BY t.{n["updated_at"]} DESC LIMIT %(limit)s
    """  # noqa: S608


@functools.cache
def settle_ended_runs() -> str:
    """End the runs the result backend says are over though their records say otherwise (a
    node died before it wrote them), and settle their pending signals ``too_late``; announce
    both on the done channel.

    Parameters by name: ``task_ids``, ``states`` (the run state of each, from Celery's),
    ``done_channel``. One row: how many runs were ended.
    """
    n, s = _run_names(), _signal_names()
    states = ", ".join(f"'{state}'" for state in (RunState.QUEUED, *RunState.LIVE))
    return f"""
        WITH ended AS (
            UPDATE {n["table"]} AS t SET {n["state"]} = r.state, {n["pid"]} = NULL,
                {n["finished_at"]} = COALESCE(t.{n["finished_at"]}, statement_timestamp()),
                {n["updated_at"]} = statement_timestamp()
            FROM unnest(%(task_ids)s::text[], %(states)s::text[]) AS r(task_id, state)
            WHERE t.{n["task_id"]} = r.task_id AND t.{n["state"]} IN ({states})
            RETURNING t.{n["task_id"]} AS task_id
        ), settled AS (
            UPDATE {s["table"]} SET {_completion(s, f"'{Outcome.TOO_LATE}'", "''")}
            WHERE {s["task_id"]} IN (SELECT task_id FROM ended) AND NOT {s["completed"]}
            RETURNING {_completed_columns(s)}
        )
        SELECT (SELECT count(*) FROM ended), ({_done_notice("settled", "%(done_channel)s")}),
            (SELECT count(pg_notify(%(done_channel)s,
                json_build_object('task_id', task_id, 'ended', true)::text)) FROM ended)
    """  # noqa: S608


@functools.cache
def settle_lost_runs() -> str:
    """Settle the queued runs whose message the broker lost (no copy of it in Redis): each
    with a pending cancel ends ``cancelled``, its cancels completed ``skipped`` (the task
    never ran and no message is left to run it; one that turns up after all is skipped at
    admission); the others are returned, their records touched, to be sent again.

    Parameters by name: ``task_ids``, ``done_channel``. One row: the runs to send again as
    a JSON list of ``[task_id, task_name, kwargs]`` (or NULL), and how many ended cancelled.
    """
    n, s = _run_names(), _signal_names()
    return f"""
        WITH lost AS (
            SELECT t.{n["task_id"]} AS task_id, EXISTS (
                SELECT 1 FROM {s["table"]} c WHERE c.{s["task_id"]} = t.{n["task_id"]}
                    AND c.{s["signal"]} = '{CANCEL_TASK}' AND NOT c.{s["completed"]}
            ) AS cancelled
            FROM {n["table"]} t
            WHERE t.{n["task_id"]} = ANY(%(task_ids)s) AND t.{n["state"]} = '{RunState.QUEUED}'
            FOR UPDATE OF t
        ), settled AS (
            UPDATE {n["table"]} AS t SET
                {n["state"]} = CASE WHEN l.cancelled THEN '{RunState.CANCELLED}'
                    ELSE t.{n["state"]} END,
                {n["finished_at"]} = CASE WHEN l.cancelled THEN statement_timestamp() END,
                {n["updated_at"]} = statement_timestamp()
            FROM lost l WHERE t.{n["task_id"]} = l.task_id
            RETURNING t.{n["task_id"]} AS task_id, t.{n["task_name"]} AS task_name,
                t.{n["kwargs"]} AS kwargs, l.cancelled AS cancelled
        ), skipped AS (
            UPDATE {s["table"]} SET {_completion(s, f"'{Outcome.SKIPPED}'", "''")}
            WHERE {s["task_id"]} IN (SELECT task_id FROM settled WHERE cancelled)
                AND {s["signal"]} = '{CANCEL_TASK}' AND NOT {s["completed"]}
            RETURNING {_completed_columns(s)}
        )
        SELECT (SELECT json_agg(json_build_array(task_id, task_name, kwargs))
                FROM settled WHERE NOT cancelled),
            (SELECT count(*) FROM settled WHERE cancelled),
            ({_done_notice("skipped", "%(done_channel)s")}),
            (SELECT count(pg_notify(%(done_channel)s,
                json_build_object('task_id', task_id, 'ended', true)::text))
             FROM settled WHERE cancelled)
    """  # noqa: S608


@functools.cache
def pending_signals_of() -> str:
    """Pending signals of a set of tasks (a node's tasks, at reconcile).

    Parameter: a list of task ids. Rows: ``id, task_id, signal, message, age``.
    """
    n = _signal_names()
    return f"""
        SELECT {n["id"]}, {n["task_id"]}, {n["signal"]}, {n["message"]},
            EXTRACT(EPOCH FROM statement_timestamp() - {n["created"]})::float8
        FROM {n["table"]}
        WHERE {n["task_id"]} = ANY(%s) AND NOT {n["completed"]}
        ORDER BY {n["id"]}
    """  # noqa: S608


def _complete(by: str) -> str:
    """Complete pending signals and announce them; ``by`` picks the rows: ``id`` (a list of
    ids) or ``cancels`` (the pending cancels of a list of tasks).

    Parameters by name: ``outcome``, ``error``, ``keys`` (the list), ``done_channel``.
    """
    n = _signal_names()
    where = {
        "id": f"{n['id']} = ANY(%(keys)s)",
        "cancels": f"{n['task_id']} = ANY(%(keys)s) AND {n['signal']} = '{CANCEL_TASK}'",
    }[by]
    return f"""
        WITH done AS (
            UPDATE {n["table"]} SET {_completion(n, "%(outcome)s", "%(error)s")}
            WHERE {where} AND NOT {n["completed"]}
            RETURNING {_completed_columns(n)}
        )
        {_done_notice("done", "%(done_channel)s")}
    """  # noqa: S608


@functools.cache
def complete_signals() -> str:
    """Complete pending signals by id (see ``_complete`` for the parameters)."""
    return _complete("id")


@functools.cache
def complete_cancels_of() -> str:
    """Complete the pending cancels of a list of tasks (see ``_complete``)."""
    return _complete("cancels")


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
    ended (``too_late``), create the run records that do not exist yet, update the others,
    and announce on the done channel every signal settled and every run that ended.

    Parameters, by name: ``ended`` (task ids), ``done_channel``; one list per column of
    :data:`RUN_COLUMNS` for every record (NULL: leave the column as it is), and the same
    prefixed ``new_`` for the records to create if missing. The UPDATE does not see the
    rows the INSERT adds (one snapshot), which already hold their values.
    """
    n, s = _run_names(), _signal_names()
    columns = ", ".join(n[name] for name in RUN_COLUMNS)
    sets = ", ".join(
        f"{n[name]} = COALESCE(r.{name}, t.{n[name]})" for name in RUN_COLUMNS if name != "task_id"
    )
    return f"""
        WITH settled AS (
            UPDATE {s["table"]} SET {_completion(s, f"'{Outcome.TOO_LATE}'", "''")}
            WHERE {s["task_id"]} = ANY(%(ended)s::text[]) AND NOT {s["completed"]}
            RETURNING {_completed_columns(s)}
        ), created AS (
            INSERT INTO {n["table"]} ({columns}, {n["updated_at"]})
            SELECT r.task_id, r.task_name, COALESCE(r.state, '{RunState.RUNNING}'), r.worker, r.pid,
                r.started_at, r.finished_at, r.progress_current, r.progress_total,
                COALESCE(r.progress_message, ''), COALESCE(r.error, ''), statement_timestamp()
            FROM {_unnest_runs("new_")}
            ON CONFLICT ({n["task_id"]}) DO NOTHING
            RETURNING 1
        ), updated AS (
            UPDATE {n["table"]} AS t SET {sets}, {n["updated_at"]} = statement_timestamp()
            FROM {_unnest_runs()}
            WHERE t.{n["task_id"]} = r.task_id
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM created), (SELECT count(*) FROM updated),
            ({_done_notice("settled", "%(done_channel)s")}),
            (SELECT count(pg_notify(%(done_channel)s,
                json_build_object('task_id', ended, 'ended', true)::text))
             FROM unnest(%(ended)s::text[]) AS ended)
    """  # noqa: S608


# -- the JSON API ----------------------------------------------------------------------------
@functools.cache
def user_by_token() -> str:
    """The user whose API token has this SHA-256 (parameter), with all its columns."""
    from django.contrib.auth import get_user_model

    from tasksignal.models import ApiToken

    user, token = _names(get_user_model()), _names(ApiToken)
    pk = get_user_model()._meta.pk
    if pk is None or pk.column is None:
        raise ImproperlyConfigured("the user model has no primary key column")
    user_pk = connection.ops.quote_name(pk.column)
    return f"""
        SELECT u.* FROM {user["table"]} u JOIN {token["table"]} t ON t.{token["user"]} = u.{user_pk}
        WHERE t.{token["key_hash"]} = %s
    """  # noqa: S608


@functools.cache
def task_facts() -> str:
    """What the API knows of a task before it signals it: its run record's state, whether
    any signal was sent to it, and the id of the cancel that stopped it (if one did).
    Parameter (by name): ``task_id``."""
    n, s = _run_names(), _signal_names()
    stopped = ", ".join(f"'{outcome}'" for outcome in Outcome.STOPPED)
    return f"""
        SELECT (SELECT {n["state"]} FROM {n["table"]} WHERE {n["task_id"]} = %(task_id)s),
            EXISTS (SELECT 1 FROM {s["table"]} WHERE {s["task_id"]} = %(task_id)s),
            (SELECT {s["id"]} FROM {s["table"]} WHERE {s["task_id"]} = %(task_id)s
                AND {s["signal"]} = '{CANCEL_TASK}' AND {s["completed"]}
                AND {s["outcome"]} IN ({stopped})
             ORDER BY {s["completed_at"]} LIMIT 1)
    """  # noqa: S608


@functools.cache
def task_status() -> str:
    """A task's run record and every signal it was sent, in one row (one round trip).

    Parameter (by name): ``task_id``. Columns: ``found`` (a record exists), then the
    record's ``task_name, state, worker, pid, started_at, finished_at, progress_current,
    progress_total, progress_message, error`` (NULL without a record), then ``signals``:
    a JSON list, oldest first.
    """
    n, s = _run_names(), _signal_names()
    run_columns = ", ".join(
        f"r.{n[name]}"
        for name in (
            "task_name",
            "state",
            "worker",
            "pid",
            "started_at",
            "finished_at",
            "progress_current",
            "progress_total",
            "progress_message",
            "error",
        )
    )
    return f"""
        SELECT r.{n["id"]} IS NOT NULL, {run_columns},
            (SELECT COALESCE(json_agg(json_build_object(
                'id', x.{s["id"]}, 'signal', x.{s["signal"]}, 'message', x.{s["message"]},
                'completed', x.{s["completed"]}, 'outcome', NULLIF(x.{s["outcome"]}, ''),
                'error', NULLIF(x.{s["error"]}, ''), 'created', x.{s["created"]},
                'completed_at', x.{s["completed_at"]}) ORDER BY x.{s["created"]}, x.{s["id"]}),
                '[]'::json)
             FROM {s["table"]} x WHERE x.{s["task_id"]} = %(task_id)s)
        FROM (SELECT 1) AS one
        LEFT JOIN {n["table"]} r ON r.{n["task_id"]} = %(task_id)s
    """  # noqa: S608


def _lineage_names() -> dict[str, str]:
    from tasksignal.models import TaskLineage

    return _names(TaskLineage)


@functools.cache
def insert_lineage() -> str:
    """Record the lineage of published tasks; a task recorded already keeps its row.

    Parameter: a JSON list of ``[task_id, [ancestor, ...]]`` pairs.
    """
    n = _lineage_names()
    return f"""
        INSERT INTO {n["table"]} ({n["task_id"]}, {n["ancestors"]}, {n["created"]})
        SELECT r->>0, ARRAY(SELECT jsonb_array_elements_text(r->1)), statement_timestamp()
        FROM jsonb_array_elements(%s::jsonb) AS r
        ON CONFLICT ({n["task_id"]}) DO NOTHING
    """  # noqa: S608


@functools.cache
def descendants_of() -> str:
    """The ids of every task recorded as descending from any of a list of tasks (or
    groups): one query, served by the lineage table's GIN index. Parameter: the list."""
    n = _lineage_names()
    return f"""
        SELECT {n["task_id"]} FROM {n["table"]}
        WHERE {n["ancestors"]} && %s::text[] ORDER BY {n["id"]}
    """  # noqa: S608


@functools.cache
def cascade_signals() -> str:
    """Send one signal to a batch of tasks in one statement: a row for each (completed
    ``too_late`` for a task whose run record, or the result backend (``ended``), says it
    finished; none where one of its kind is pending already), each pending one announced
    on its task's channel.

    Parameters by name: ``task_ids``, ``channels`` (each task's signal channel), ``ended``,
    ``signal``, ``message``, ``requested_by``, ``source``, ``cascade``. One row: how many
    of the batch had not finished (the signal is pending for each of them now).
    """
    from tasksignal.notify import MAX_MESSAGE_IN_PAYLOAD

    n, r = _signal_names(), _run_names()
    finished = ", ".join(f"'{state}'" for state in sorted(RunState.FINISHED))
    now = "statement_timestamp()"
    return f"""
        WITH batch AS (
            SELECT b.task_id, b.channel,
                b.ended OR COALESCE(t.{r["state"]} IN ({finished}), false) AS finished
            FROM unnest(%(task_ids)s::text[], %(channels)s::text[], %(ended)s::boolean[])
                AS b(task_id, channel, ended)
            LEFT JOIN {r["table"]} t ON t.{r["task_id"]} = b.task_id
        ), inserted AS (
            INSERT INTO {n["table"]} ({n["task_id"]}, {n["signal"]}, {n["message"]},
                {n["requested_by"]}, {n["source"]}, {n["cascade"]}, {n["completed"]},
                {n["outcome"]}, {n["error"]}, {n["created"]}, {n["modified"]},
                {n["acknowledged_at"]}, {n["completed_at"]})
            SELECT task_id, %(signal)s, %(message)s, %(requested_by)s, %(source)s, %(cascade)s,
                finished, CASE WHEN finished THEN '{Outcome.TOO_LATE}' ELSE '' END, '',
                {now}, {now}, CASE WHEN finished THEN {now} END,
                CASE WHEN finished THEN {now} END
            FROM batch
            ON CONFLICT ({n["task_id"]}, {n["signal"]}) WHERE NOT {n["completed"]} DO NOTHING
            RETURNING {n["id"]}, {n["task_id"]}, {n["signal"]}, {n["message"]}, {n["completed"]}
        )
        SELECT (SELECT count(*) FROM batch WHERE NOT finished),
            (SELECT count(pg_notify(b.channel, json_build_object(
                'id', i.{n["id"]}, 'task_id', i.{n["task_id"]}, 'signal', i.{n["signal"]},
                'message', left(i.{n["message"]}, {MAX_MESSAGE_IN_PAYLOAD}),
                'truncated', length(i.{n["message"]}) > {MAX_MESSAGE_IN_PAYLOAD})::text))
             FROM inserted i JOIN batch b ON b.task_id = i.{n["task_id"]}
             WHERE NOT i.{n["completed"]})
    """  # noqa: S608
