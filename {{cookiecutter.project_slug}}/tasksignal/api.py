"""The JSON API: start tasks, send them signals, read what became of them.

Plain Django views: each request costs Django's middleware, one token lookup, and the
queries of the operation itself, nothing more (see ``docs/api.md`` for why no framework).
:func:`endpoint` gives every view the same behaviour: a 405 for undocumented methods,
authentication and the model permission, a CSRF check for session-authenticated writes,
and JSON errors, including 503 when PostgreSQL or Redis is away. The document describing
all this is ``openapi.py``; the tests hold the two together.
"""

import functools
import json
import logging
import uuid

import kombu.exceptions
import redis
from celery import current_app, states
from celery.exceptions import BackendError
from django.core.exceptions import BadRequest, RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError, connection, transaction
from django.http import HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from tasksignal import conf, openapi
from tasksignal.auth import AuthenticationFailed, authenticate, csrf_failure
from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import RECORDED_HEADER

logger = logging.getLogger(__name__)

START_PERMISSION = "tasksignal.add_taskrun"
SIGNAL_PERMISSION = "tasksignal.add_celerytasksignal"
READ_PERMISSION = "tasksignal.view_taskrun"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Longest task id accepted, the width of the ``task_id`` columns.
MAX_TASK_ID_LENGTH = 255

DATABASE_ERRORS = (OperationalError, InterfaceError)
REDIS_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, BackendError)
DATABASE_UNAVAILABLE = "the database (PostgreSQL) is unavailable; retry later"
REDIS_UNAVAILABLE = "Redis (the broker or the result backend) is unavailable; retry later"


class ApiError(Exception):
    """An answer other than success: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> JsonResponse:
        """The JSON response for this error."""
        return error_response(self.status, self.message, self.headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None):
    """``{"error": message}`` with ``status`` and ``headers``."""
    return JsonResponse({"error": message}, status=status, headers=headers)


def endpoint(*methods: str, permission: str | None):
    """Make a view an API endpoint answering ``methods``; ``permission=None`` means public.

    The view is called as ``view(request, user, **url_kwargs)``, with ``user`` ``None``
    for public views. The order of checks is method (405), credentials (401), CSRF for
    session writes and permission (403), then the view's own (400, 404, 413); database
    and Redis failures anywhere become 503.
    """
    allowed = ", ".join(methods)

    def decorate(view):
        @functools.wraps(view)
        def wrapper(request, **kwargs):
            if request.method not in methods:
                return error_response(
                    405,
                    f"method {request.method} not allowed; allowed: {allowed}",
                    {"Allow": allowed},
                )
            try:
                user = None
                if permission is not None:
                    user = _authorize(request, permission)
                return view(request, user, **kwargs)
            except ApiError as exc:
                return exc.response()
            except AuthenticationFailed as exc:
                return error_response(401, exc.message, {"WWW-Authenticate": exc.challenge})
            except BadRequest as exc:
                return error_response(400, str(exc))
            except DATABASE_ERRORS as exc:
                logger.warning("API request failed, database unavailable: %s", exc)
                return error_response(503, DATABASE_UNAVAILABLE)
            except REDIS_ERRORS as exc:
                logger.warning("API request failed, Redis unavailable: %s", exc)
                return error_response(503, REDIS_UNAVAILABLE)

        wrapper.api_methods = methods
        wrapper.api_permission = permission
        # Token requests need no CSRF token; session requests are checked in _authorize().
        return csrf_exempt(wrapper)

    return decorate


def _authorize(request, permission: str):
    caller = authenticate(request)
    if not caller.by_token and request.method not in SAFE_METHODS:
        reason = csrf_failure(request)
        if reason is not None:
            raise ApiError(403, f"CSRF check failed: {reason}")
    if not caller.user.has_perm(permission):
        raise ApiError(403, f"permission {permission} required")
    return caller.user


# -- request parsing ------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_body(request, *, required: bool) -> dict:
    """The request body as a JSON object; an empty body is ``{}`` unless ``required``."""
    try:
        raw = request.body
    except RequestDataTooBig:
        raise ApiError(413, "request body too large") from None
    if not raw.strip() or _empty_form(request):
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _empty_form(request) -> bool:
    """True for a form body without fields, which some clients send for "no body"
    (Django's test client does on ``client.post(url)``)."""
    if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return False
    try:
        return not request.POST and not request.FILES
    except (MultiPartParserError, SuspiciousOperation):
        return False  # not an empty form; the JSON parser will say what is wrong


def _fields(data: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ApiError(
            400, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )


def _text(data: dict, name: str, *, required: bool = False) -> str:
    """The string field ``name``: storable in PostgreSQL (UTF-8, no NUL characters)."""
    if name not in data:
        if required:
            raise ApiError(400, f"field {name!r} is required")
        return ""
    value = data[name]
    if not isinstance(value, str):
        raise ApiError(400, f"field {name!r} must be a string")
    if "\x00" in value or not _encodable(value):
        raise ApiError(400, f"field {name!r} must be UTF-8 text without NUL characters")
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plausible_task_id(task_id: str) -> bool:
    return len(task_id) <= MAX_TASK_ID_LENGTH and "\x00" not in task_id and _encodable(task_id)


def _unknown_task(task_id: str) -> ApiError:
    return ApiError(404, f"no task with id {task_id!r}")


def require_known_task(task_id: str) -> None:
    """Raise a 404 ``ApiError`` unless a run record or a signal exists for ``task_id``."""
    if not _plausible_task_id(task_id):
        raise _unknown_task(task_id)
    with connection.cursor() as cursor:
        cursor.execute(_known_task_sql(), [task_id, task_id])
        (known,) = cursor.fetchone()
    if not known:
        raise _unknown_task(task_id)


@functools.cache
def _known_task_sql() -> str:
    # Every signal request runs this: one round trip, and as SQL written once it costs a
    # fraction of the CPU of two ORM .exists() queries, which are compiled each time.
    quote = connection.ops.quote_name
    run, signal = TaskRun._meta, CeleryTaskSignal._meta
    run_id, signal_id = run.get_field("task_id").column, signal.get_field("task_id").column
    return (
        f"SELECT EXISTS (SELECT 1 FROM {quote(run.db_table)} WHERE {quote(run_id)} = %s) "  # noqa: S608
        f"OR EXISTS (SELECT 1 FROM {quote(signal.db_table)} WHERE {quote(signal_id)} = %s)"
    )


# -- serialisation --------------------------------------------------------------------------
def _iso(moment) -> str | None:
    return None if moment is None else moment.isoformat()


def signal_json(row: CeleryTaskSignal, *, task_id: bool = True) -> dict:
    """The API's view of a signal row."""
    data = {"id": row.pk, "task_id": row.task_id} if task_id else {"id": row.pk}
    data.update(
        signal=row.signal,
        completed=row.completed,
        outcome=row.outcome or None,
        created=_iso(row.created),
        completed_at=_iso(row.completed_at),
    )
    return data


def _jsonable(value):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)  # a result backend that pickles can hold anything
    return value


# -- views ----------------------------------------------------------------------------------
@endpoint("GET", permission=None)
def openapi_document(request, user):
    """``GET /api/openapi.json``: the OpenAPI 3 document; public, it holds no data."""
    return HttpResponse(openapi.document_bytes(), content_type="application/json")


@endpoint("POST", permission=START_PERMISSION)
def start_task(request, user):
    """``POST /api/tasks/``: record a queued run, then queue the task once that commits."""
    data = json_body(request, required=True)
    _fields(data, ("task", "kwargs"))
    name = _text(data, "task", required=True)
    kwargs = data.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ApiError(400, "field 'kwargs' must be a JSON object")
    allowed = conf.get("TASKSIGNAL_STARTABLE_TASKS")
    if name not in allowed:
        names = ", ".join(allowed) or "none (set TASKSIGNAL_STARTABLE_TASKS)"
        raise ApiError(400, f"task {name!r} may not be started through the API; allowed: {names}")
    _ping_result_backend()
    task_id = str(uuid.uuid4())
    try:
        with transaction.atomic():
            TaskRun.objects.create(task_id=task_id, task_name=name, state=TaskRun.State.QUEUED)
            # After the commit: a worker that picks the task up at once finds its record.
            transaction.on_commit(
                lambda: current_app.send_task(
                    name, kwargs=kwargs, task_id=task_id, headers={RECORDED_HEADER: True}
                )
            )
    except Exception as exc:
        if not _redis_failure(exc):
            raise
        logger.warning("could not queue %s[%s]: %r", name, task_id, exc)
        TaskRun.objects.filter(task_id=task_id, state=TaskRun.State.QUEUED).delete()
        raise ApiError(503, REDIS_UNAVAILABLE) from None
    location = reverse("tasksignal:task-detail", kwargs={"task_id": task_id})
    return JsonResponse(
        {"id": task_id, "task": name, "state": TaskRun.State.QUEUED},
        status=202,
        headers={"Location": location},
    )


def _ping_result_backend() -> None:
    """Fail fast (a Redis error, so 503) when the Redis result backend is down.

    ``send_task`` subscribes to the task's result before publishing, and the Redis result
    backend retries that for about 20 seconds before giving up; one PING (~0.1 ms) spares
    a client that wait in the usual case, Redis already down when the request comes.
    """
    client = getattr(current_app.backend, "client", None)
    if isinstance(client, redis.Redis):
        client.ping()


def _redis_failure(exc: BaseException) -> bool:
    # Before publishing, Celery's Redis result backend subscribes to the result; when it
    # cannot reconnect it gives up with a RuntimeError caused by the Redis error.
    return isinstance(exc, REDIS_ERRORS) or (
        isinstance(exc, RuntimeError) and isinstance(exc.__cause__, REDIS_ERRORS)
    )


@endpoint("GET", permission=READ_PERMISSION)
def task_status(request, user, task_id: str):
    """``GET /api/tasks/<id>/``: Celery state, run record, signals and cancel latency."""
    if not _plausible_task_id(task_id):
        raise _unknown_task(task_id)
    try:
        run = TaskRun.objects.get(task_id=task_id)
    except TaskRun.DoesNotExist:
        run = None
    signals = list(CeleryTaskSignal.objects.filter(task_id=task_id).order_by("created", "pk"))
    result = current_app.AsyncResult(task_id)
    state = result.state  # one read from the result backend; a finished result is cached
    # A brief run that succeeded leaves no run record (see TaskRun); Celery still knows it.
    if run is None and not signals and state == states.PENDING:
        raise _unknown_task(task_id)
    cancels = [row for row in signals if row.signal == CeleryTaskSignal.CANCEL_TASK]
    cancel = cancels[-1] if cancels else None
    latency_ms = None
    if cancel is not None and cancel.completed_at is not None:
        latency_ms = round((cancel.completed_at - cancel.created).total_seconds() * 1000, 3)
    return JsonResponse(
        {
            "id": task_id,
            "task": run.task_name if run else None,
            "state": state,
            "run_state": run.state if run else None,
            "result": _jsonable(result.result) if state == states.SUCCESS else None,
            "outcome": (cancel.outcome or None) if cancel else None,
            "progress": run.progress if run else None,
            "paused": run is not None and run.state == TaskRun.State.PAUSED,
            "cancel_requested_at": _iso(cancel.created) if cancel else None,
            "stopped_at": _iso(cancel.completed_at) if cancel else None,
            "latency_ms": latency_ms,
            "signals": [signal_json(row, task_id=False) for row in signals],
        }
    )


def _send(user, task_id: str, signal: str, message: str) -> JsonResponse:
    require_known_task(task_id)
    row = CeleryTaskSignal.objects.send(task_id, signal, message, requested_by=user)
    return JsonResponse(signal_json(row), status=202)


def _send_from_body(request, user, task_id: str, signal: str) -> JsonResponse:
    data = json_body(request, required=False)
    _fields(data, ("message",))
    return _send(user, task_id, signal, _text(data, "message"))


@endpoint("POST", permission=SIGNAL_PERMISSION)
def cancel_task(request, user, task_id: str):
    """``POST /api/tasks/<id>/cancel/``: send ``cancel_task`` (idempotent while pending)."""
    return _send_from_body(request, user, task_id, CeleryTaskSignal.CANCEL_TASK)


@endpoint("POST", permission=SIGNAL_PERMISSION)
def pause_task(request, user, task_id: str):
    """``POST /api/tasks/<id>/pause/``: send ``pause_task`` (idempotent while pending)."""
    return _send_from_body(request, user, task_id, CeleryTaskSignal.PAUSE_TASK)


@endpoint("POST", permission=SIGNAL_PERMISSION)
def resume_task(request, user, task_id: str):
    """``POST /api/tasks/<id>/resume/``: send ``resume_task`` (idempotent while pending)."""
    return _send_from_body(request, user, task_id, CeleryTaskSignal.RESUME_TASK)


@endpoint("POST", permission=SIGNAL_PERMISSION)
def signal_task(request, user, task_id: str):
    """``POST /api/tasks/<id>/signals/``: send any built-in or registered signal kind."""
    data = json_body(request, required=True)
    _fields(data, ("signal", "message"))
    signal = _text(data, "signal", required=True)
    message = _text(data, "message")
    return _send(user, task_id, signal, message)  # an UnknownSignal is answered with 400


@endpoint("POST", permission=SIGNAL_PERMISSION)
def revoke_task(request, user, task_id: str):
    """``POST /api/tasks/<id>/revoke/``: benchmark baseline, Celery's kill by revoke.

    Enabled only by ``TASKSIGNAL_API_BASELINE_REVOKE``: it stops a task with SIGKILL, with
    no cleanup and no record of whether it worked, which is what the signals improve on.
    """
    if not conf.get("TASKSIGNAL_API_BASELINE_REVOKE"):
        raise ApiError(
            404,
            "the revoke baseline is disabled; it exists for benchmarks only "
            "(TASKSIGNAL_API_BASELINE_REVOKE=True enables it)",
        )
    require_known_task(task_id)
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        (revoked_at,) = cursor.fetchone()
    current_app.control.revoke(task_id, terminate=True, signal="SIGKILL")
    return JsonResponse({"id": task_id, "revoked_at": _iso(revoked_at)}, status=202)


@csrf_exempt
def not_found(request, path: str = ""):
    """Any other path under the API: a JSON 404 (never Django's HTML page or a redirect)."""
    return error_response(404, f"no API endpoint at {request.path!r}")
