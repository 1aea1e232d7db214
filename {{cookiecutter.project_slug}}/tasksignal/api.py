"""The JSON API: start tasks, send them signals, see them stop, read what became of them.

Built with django-ninja: the endpoints below declare their parameters and answers with
pydantic schemas, ninja validates requests with them and generates the OpenAPI document
(``/api/openapi.json``) from them. What the API answers differs from ninja's defaults in a
few deliberate ways, all set up here: every error is ``{"error": "..."}`` (400, not 422,
for a request of the wrong shape; 401 with a ``WWW-Authenticate: Bearer`` challenge; 503
when PostgreSQL or Redis is away; JSON 404 and 405 for every path under ``/api/``).

Seeing a stop without polling: ``POST /api/tasks/<id>/cancel/?wait=10`` answers once the
cancel is completed (with its outcome and latency) or after 10 seconds, whichever comes
first; ``GET /api/tasks/<id>/?wait=10`` once the task has finished. A waiting request
holds no database connection and costs no CPU while it waits (``waiting.py``).

Hot paths are written-once SQL (``sql.py``): a cancel costs one query to learn what the
database knows of the task and one to write (and announce) the signal; a status read one
query, plus a result-backend read only when the database does not know how the run ended
or the run succeeded (its result lives there). Tokens are cached per process (``auth.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, NoReturn

import kombu.exceptions
import redis
from celery import current_app, states
from celery.exceptions import BackendError
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError, connection, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.urls import reverse
from ninja import NinjaAPI, Query, Schema
from ninja.errors import HttpError, ValidationError
from ninja.parser import Parser
from ninja.security.base import AuthBase
from pydantic import AfterValidator, ConfigDict, Field, StrictBool, StringConstraints

from tasksignal import conf, sql, waiting
from tasksignal.auth import AuthenticationFailed, authenticate, csrf_failure
from tasksignal.cascade import send_to_all
from tasksignal.exceptions import UnknownSignal
from tasksignal.filters import AGE_PATTERN, UNFINISHED_STATES, parse_age, runs_matching
from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun
from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK, get_signal_kind
from tasksignal.states import RECORDED_HEADER, RunState, Source

#: A Django view, as the URLconf calls it.
View = Callable[..., HttpResponse]

logger = logging.getLogger(__name__)

START_PERMISSION = "tasksignal.add_taskrun"
SIGNAL_PERMISSION = "tasksignal.add_celerytasksignal"
READ_PERMISSION = "tasksignal.view_taskrun"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Longest task id accepted, the width of the ``task_id`` columns.
MAX_TASK_ID_LENGTH = 255
#: Most runs one page of ``GET /api/tasks/`` lists.
MAX_PAGE = 500

DATABASE_ERRORS = (OperationalError, InterfaceError)
REDIS_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, BackendError)
DATABASE_UNAVAILABLE = "the database (PostgreSQL) is unavailable; retry later"
REDIS_UNAVAILABLE = "Redis (the broker or the result backend) is unavailable; retry later"
#: Celery's state of a run whose end the database knows.
RUN_TO_CELERY_STATE = {
    RunState.SUCCEEDED: states.SUCCESS,
    RunState.FAILED: states.FAILURE,
    RunState.CANCELLED: states.REVOKED,
}


class ApiError(Exception):
    """An answer other than success: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Encoder(DjangoJSONEncoder):
    """Django's JSON, but times to the microsecond (the database clock's resolution)."""

    def default(self, o: object) -> Any:
        """Datetimes as full ISO 8601; everything else as Django encodes it."""
        if isinstance(o, datetime):
            return o.isoformat()
        return super().default(o)


def json_response(
    data: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JsonResponse:
    """A JSON answer, encoded with :class:`Encoder`."""
    return JsonResponse(data, status=status, headers=headers, encoder=Encoder)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    """``{"error": message}`` with ``status`` and ``headers``."""
    return json_response({"error": message}, status, headers)


# -- request bodies -------------------------------------------------------------------------
def _storable(value: str) -> str:
    """Text PostgreSQL can store: UTF-8 (no lone surrogates), no NUL character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be UTF-8 text") from None
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


#: Text fields: the document says "no NUL" (a pattern) so that clients and fuzzers know it.
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$"), AfterValidator(_storable)]


class Body(Schema):
    """A request body: a JSON object with exactly the documented fields."""

    model_config = ConfigDict(extra="forbid")


class StartIn(Body):
    """``POST /api/tasks/``: which task to start, and its keyword arguments."""

    task: Text = Field(description="One of the task names in TASKSIGNAL_STARTABLE_TASKS.")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class MessageIn(Body):
    """The optional body of cancel, pause and resume."""

    message: Text = Field("", description="Text for the task to read.")


class SignalIn(Body):
    """``POST /api/tasks/<id>/signals/``: any built-in or registered signal kind."""

    signal: Text = Field(description="cancel_task, pause_task, resume_task or a registered kind")
    message: Text = ""


#: What ``POST /api/cancels/`` picks runs by; a request gives at least one.
CANCEL_CRITERIA = ("task", "state", "worker", "older_than")


class CancelsIn(Body):
    """``POST /api/cancels/``: which unfinished runs to cancel (at least one criterion).

    The criteria may be left out but not null: the document then says exactly what is
    accepted (an object with one of them at least). Their default, None, is what the
    pydantic plugin of mypy calls a wrong type for a ``str`` field (hence the ignores).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"anyOf": [{"required": [name]} for name in CANCEL_CRITERIA]},
    )

    task: Text = Field(None, description="Runs of this task name.")  # type: ignore[assignment]
    state: Text = Field(  # type: ignore[assignment]
        None, description="Runs in this state.", json_schema_extra={"enum": list(UNFINISHED_STATES)}
    )
    worker: Text = Field(None, description="Runs on this worker node.")  # type: ignore[assignment]
    older_than: Annotated[str, StringConstraints(pattern=AGE_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="Runs started longer ago: seconds, or with a unit: 90s, 10m, 2h, 1d."
    )
    cascade: StrictBool = Field(False, description="Also every task they started.")
    message: Text = Field("", description="Text for the tasks to read.")


class JsonBodyParser(Parser):
    """JSON bodies, strictly: an object, no NaN or Infinity; an empty body, ``null`` or an
    empty form (what some clients send for "no body") is ``{}``. Query parameters, strictly:
    each at most once."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        """Parse the body; a ``ValueError`` says what is wrong with it."""
        raw = request.body
        if not raw.strip() or _empty_form(request):
            return {}
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"request body is not valid JSON: {exc}") from None
        if data is None:  # JSON null: no body, as the document allows for optional ones
            return {}
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    def parse_querydict(
        self, data: Any, list_fields: list[str], request: HttpRequest
    ) -> dict[str, Any]:
        """Query parameters, each given once (ninja would silently keep the last one)."""
        repeated = sorted(
            key for key in data if key not in list_fields and len(data.getlist(key)) > 1
        )
        if repeated:
            raise ApiError(400, f"query parameter(s) given more than once: {', '.join(repeated)}")
        return super().parse_querydict(data, list_fields, request)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _empty_form(request: HttpRequest) -> bool:
    if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return False
    try:
        return not request.POST and not request.FILES
    except (MultiPartParserError, SuspiciousOperation):
        return False  # not an empty form; the JSON parser will say what is wrong


# -- answers --------------------------------------------------------------------------------
class ErrorOut(Schema):
    """Every error answer."""

    error: str


class StartOut(Schema):
    """A task started: its id and its run record's state."""

    id: str
    task: str
    state: str


class SignalOut(Schema):
    """A signal: pending, or completed with its outcome and latency."""

    id: int
    task_id: str
    signal: str
    message: str
    completed: bool
    outcome: str | None
    created: datetime
    completed_at: datetime | None
    latency_ms: float | None = Field(description="completed_at - created, database clock")
    already_pending: bool = Field(
        description="True when a signal of this kind was pending already: this is that one"
    )
    already_stopped: bool = Field(
        description="True when a cancel had stopped the task already: this is that cancel "
        "(so a cancel is safe to send again, after a 503 or a lost answer)",
    )
    reached: int | None = Field(
        None,
        description="With ?cascade: how many tasks the signal reached (this one and "
        "every task it started)",
    )
    still_to_stop: int | None = Field(
        None, description="With ?cascade: how many of those had not finished when it was sent"
    )


class CancelsOut(Schema):
    """What a cancel of the runs matching a filter reached."""

    matched: int = Field(description="Unfinished runs that matched")
    reached: int = Field(description="Tasks cancelled: the runs, and with cascade their tasks")
    still_to_stop: int = Field(description="Of those, how many had not finished")


class SignalRecord(Schema):
    """A signal as a task's status lists it."""

    id: int
    signal: str
    message: str
    completed: bool
    outcome: str | None
    error: str | None
    created: datetime
    completed_at: datetime | None


class TaskOut(Schema):
    """What became of a task: Celery's state, its run record, its signals."""

    id: str
    task: str | None
    state: str = Field(description="Celery's state (PENDING while queued or running)")
    run_state: str | None = Field(description="the run record's state, if it has one")
    finished: bool = Field(
        description="it succeeded, failed or stopped; a stopped task once its cancel's outcome"
        " is written"
    )
    result: Any = Field(description="the return value, once SUCCESS")
    error: str | None
    outcome: str | None = Field(description="how the latest cancel was met")
    progress: float | None
    progress_message: str | None
    paused: bool
    worker: str | None
    pid: int | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    stopped_at: datetime | None
    latency_ms: float | None
    signals: list[SignalRecord]


class RunOut(Schema):
    """A run in a list of runs."""

    id: str
    task: str
    run_state: str
    worker: str
    pid: int | None
    progress: float | None
    started_at: datetime | None
    finished_at: datetime | None


class RunPage(Schema):
    """One page of runs, newest first; ``next`` is the next page's URL, if any."""

    results: list[RunOut]
    next: str | None


ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 503)}
WRITE_ERRORS = {**ERRORS, 413: ErrorOut}


class Parameters(Schema):
    """Query parameters: exactly the documented ones (an unknown one is a 400)."""

    model_config = ConfigDict(extra="forbid")


class WaitParameters(Parameters):
    """``?wait=``: how long to wait for the stop (or the end) before answering."""

    wait: float = Field(
        0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait for the stop (or the end) before answering; 0: answer "
        "at once. At most TASKSIGNAL_MAX_WAIT.",
    )


class SignalParameters(WaitParameters):
    """Cancel, pause and resume: ``?wait=``, and ``?cascade=`` for everything it started."""

    cascade: bool = Field(
        False,
        description="Also send it to every task this one started, directly or through "
        "chains, groups and chords (a cancel also reaches tasks they start later); the "
        "task id may be a group's.",
    )


class RunFilters(Parameters):
    """Which runs ``GET /api/tasks/`` lists, and from where."""

    state: Text | None = Field(None, description="a run state")
    task: Text | None = Field(None, description="a task name")
    worker: Text | None = Field(None, description="a worker's node name")
    limit: int = Field(50, ge=1, le=MAX_PAGE)
    before: int | None = Field(None, description="the cursor of the next page")


# -- authentication -------------------------------------------------------------------------
class TokenOrSession(AuthBase):
    """Ninja authentication for one permission: a token or a session, then the permission.

    A session request that changes something must pass Django's CSRF check. The OpenAPI
    document names the scheme after this class and describes it as a bearer token.
    """

    openapi_type = "http"
    openapi_scheme = "bearer"
    openapi_description = (
        "An API token (manage.py create_api_token) as 'Authorization: Bearer <token>', or "
        "the session of a user logged in to this site (with Django's CSRF token to POST)."
    )

    def __init__(self, permission: str) -> None:
        super().__init__()
        self.permission = permission

    def __call__(self, request: HttpRequest) -> Any:
        caller = authenticate(request)
        if not caller.by_token and request.method not in SAFE_METHODS:
            reason = csrf_failure(request)
            if reason is not None:
                raise ApiError(403, f"CSRF check failed: {reason}")
        if not caller.user.has_perm(self.permission):
            raise ApiError(403, f"permission {self.permission} required")
        return caller.user


api = NinjaAPI(
    title="Task signals",
    version="1",
    description="Start Celery tasks, cancel, pause and resume them while they run, see them "
    "stop without polling, and read what became of them.",
    urls_namespace="tasksignal",
    docs_url=None,  # Swagger UI loads its assets from a CDN: not every deployment reaches one
    parser=JsonBodyParser(),
)


@api.exception_handler(ApiError)
def _api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error_response(exc.status, exc.message, exc.headers)


@api.exception_handler(AuthenticationFailed)
def _unauthenticated(request: HttpRequest, exc: AuthenticationFailed) -> HttpResponse:
    return error_response(401, exc.message, {"WWW-Authenticate": exc.challenge})


@api.exception_handler(PermissionDenied)
def _forbidden(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    return error_response(403, str(exc) or "permission denied")


@api.exception_handler(ValidationError)
def _invalid(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    problems = []
    for error in exc.errors:
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(400, "; ".join(problems) or "invalid request")


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # A body that cannot be parsed: the parser's own message says why.
    cause = exc.__cause__
    message = str(cause) if exc.status_code == 400 and isinstance(cause, ValueError) else None
    return error_response(exc.status_code, message or exc.message)


@api.exception_handler(waiting.ClientGone)
def _client_gone(request: HttpRequest, exc: waiting.ClientGone) -> HttpResponse:
    logger.info("client waiting for %s went away", exc)
    return error_response(499, "client closed the connection")  # nobody reads it


@api.exception_handler(UnknownSignal)
def _unknown_signal(request: HttpRequest, exc: UnknownSignal) -> HttpResponse:
    return error_response(400, str(exc))


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(413, "request body too large")


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def _database_down(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.warning("API request failed, database unavailable: %s", exc)
    return error_response(503, DATABASE_UNAVAILABLE)


@api.exception_handler(redis.RedisError)
@api.exception_handler(kombu.exceptions.OperationalError)
@api.exception_handler(BackendError)
def _redis_down(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.warning("API request failed, Redis unavailable: %s", exc)
    return error_response(503, REDIS_UNAVAILABLE)


# -- helpers ---------------------------------------------------------------------------------
def _unknown_task(task_id: str) -> ApiError:
    return ApiError(404, f"no task with id {task_id!r}")


def _check_task_id(task_id: str) -> None:
    if len(task_id) > MAX_TASK_ID_LENGTH or "\x00" in task_id:
        raise _unknown_task(task_id)
    try:
        task_id.encode("utf-8")
    except UnicodeEncodeError:
        raise _unknown_task(task_id) from None


def _query(statement: str, params: Any) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall()


def _deadline(wait: float) -> float:
    return time.monotonic() + min(wait, conf.get("TASKSIGNAL_MAX_WAIT"))


def _release_connection() -> None:
    """Give this thread's database connection back before it waits (to the pool, when
    ``bin/web`` runs one): a waiting request must hold none."""
    if not connection.in_atomic_block:
        connection.close()


# -- endpoints --------------------------------------------------------------------------------
@api.post(
    "/tasks/",
    response={202: StartOut, **WRITE_ERRORS},
    auth=TokenOrSession(START_PERMISSION),
    url_name="task-start",
    summary="Start a task",
)
def start_task(request: HttpRequest, payload: StartIn) -> HttpResponse:
    """Record a queued run, then queue the task once that commits (a worker that picks it up
    at once finds its record). Only the tasks in ``TASKSIGNAL_STARTABLE_TASKS`` may start.

    Permission: ``tasksignal.add_taskrun``."""
    allowed = conf.get("TASKSIGNAL_STARTABLE_TASKS")
    if payload.task not in allowed:
        names = ", ".join(allowed) or "none (set TASKSIGNAL_STARTABLE_TASKS)"
        raise ApiError(
            400, f"task {payload.task!r} may not be started through the API; allowed: {names}"
        )
    task_id = start_recorded(payload.task, payload.kwargs)
    location = reverse("tasksignal:task-detail", kwargs={"task_id": task_id})
    body = {"id": task_id, "task": payload.task, "state": RunState.QUEUED}
    return json_response(body, 202, {"Location": location})


def start_recorded(name: str, kwargs: dict[str, Any]) -> str:
    """Start task ``name`` with ``kwargs`` with a ``queued`` run record; return its id.

    The record commits first, then the message goes out, marked so that even a task that
    is not signal-aware has its record kept true by the worker node. Raises ``ApiError``
    (503) when Redis cannot take the message; the record is then removed.
    """
    _ping_result_backend()
    task_id = str(uuid.uuid4())
    try:
        with transaction.atomic():
            TaskRun.objects.create(
                task_id=task_id, task_name=name, state=RunState.QUEUED, kwargs=_kept_kwargs(kwargs)
            )
            transaction.on_commit(
                lambda: current_app.send_task(
                    name, kwargs=kwargs, task_id=task_id, headers={RECORDED_HEADER: True}
                )
            )
    except Exception as exc:
        if not _redis_failure(exc):
            raise
        logger.warning("could not queue %s[%s]: %r", name, task_id, exc)
        TaskRun.objects.filter(task_id=task_id, state=RunState.QUEUED).delete()
        raise ApiError(503, REDIS_UNAVAILABLE) from None
    return task_id


def _kept_kwargs(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``kwargs`` to keep on the run record, or ``None`` when PostgreSQL's ``jsonb`` cannot
    store them: a NUL character or a lone surrogate (the task itself may well take them)."""
    text = json.dumps(kwargs, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return None if "\\u0000" in text else kwargs


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


@api.get(
    "/tasks/",
    response={200: RunPage, **ERRORS},
    auth=TokenOrSession(READ_PERMISSION),
    url_name="task-list",
    summary="List runs",
)
def list_tasks(request: HttpRequest, filters: Query[RunFilters]) -> HttpResponse:
    """Runs, newest first, filtered by state, task name and worker, a page at a time.

    Permission: ``tasksignal.view_taskrun``."""
    runs = TaskRun.objects.order_by("-pk")
    for field, value in (
        ("state", filters.state),
        ("task_name", filters.task),
        ("worker", filters.worker),
    ):
        if value is not None:
            runs = runs.filter(**{field: value})
    if filters.before is not None:
        runs = runs.filter(pk__lt=filters.before)
    page = list(runs[: filters.limit + 1])
    following = None
    if len(page) > filters.limit:
        page = page[: filters.limit]
        query = request.GET.copy()
        query["before"] = str(page[-1].pk)
        following = f"{request.path}?{query.urlencode()}"
    return json_response(
        {
            "results": [
                {
                    "id": run.task_id,
                    "task": run.task_name,
                    "run_state": run.state,
                    "worker": run.worker,
                    "pid": run.pid,
                    "progress": run.progress,
                    "started_at": run.started_at,
                    "finished_at": run.finished_at,
                }
                for run in page
            ],
            "next": following,
        }
    )


@api.get(
    "/tasks/{task_id}/",
    response={200: TaskOut, **ERRORS},
    auth=TokenOrSession(READ_PERMISSION),
    url_name="task-detail",
    summary="Read a task (optionally waiting for it to finish)",
)
def task_status(request: HttpRequest, task_id: str, query: Query[WaitParameters]) -> HttpResponse:
    """Celery state, run record, signals and cancel latency; with ``wait``, answered when the
    task finishes (stopped, succeeded or failed) or when ``wait`` seconds have passed.

    Permission: ``tasksignal.view_taskrun``."""
    _check_task_id(task_id)
    if not query.wait:
        return json_response(read_status(task_id))
    deadline = _deadline(query.wait)
    with waiting.hub.watch(task_id) as waiter:
        while True:
            status = read_status(task_id)
            if status["finished"] or time.monotonic() >= deadline:
                return json_response(status)
            _release_connection()
            waiter.wait(
                lambda notice: notice.get("ended") or notice.get("signal"),
                deadline,
                waiting.client_gone(request),
            )


def read_status(task_id: str) -> dict[str, Any]:
    """The status document of ``task_id``; raises a 404 ``ApiError`` if nothing knows it."""
    ((found, name, run_state, worker, pid, started, finished, current, total, message, error,
      signals),) = _query(sql.task_status(), {"task_id": task_id})  # fmt: skip
    if isinstance(signals, str):
        signals = json.loads(signals)
    for signal in signals:  # PostgreSQL's JSON writes times in its own, shorter, style
        for key in ("created", "completed_at"):
            if signal[key] is not None:
                signal[key] = datetime.fromisoformat(signal[key])
    state, result = RUN_TO_CELERY_STATE.get(run_state), None
    if state is None or state == states.SUCCESS:
        # The database does not know how it ended, or the result lives in the backend.
        meta = current_app.AsyncResult(task_id)
        state = meta.state
        result = _jsonable(meta.result) if state == states.SUCCESS else None
    # A brief run that succeeded leaves no run record (see TaskRun); Celery still knows it.
    if not found and not signals and state == states.PENDING:
        raise _unknown_task(task_id)
    cancels = [row for row in signals if row["signal"] == CANCEL_TASK]
    cancel = cancels[-1] if cancels else None
    ended = run_state in RunState.FINISHED or state in states.READY_STATES
    # A stopped task stores REVOKED a moment before its node completes the cancel: it is
    # finished once the cancel's outcome is written, so that a reader gets both at once.
    stopping = state == states.REVOKED and cancel is not None and cancel["completed_at"] is None
    return {
        "id": task_id,
        "task": name,
        "state": state,
        "run_state": run_state,
        "finished": ended and not stopping,
        "result": result,
        "error": error or None,
        "outcome": cancel["outcome"] if cancel else None,
        "progress": min(1.0, current / total) if current is not None and total else None,
        "progress_message": message or None,
        "paused": run_state == RunState.PAUSED,
        "worker": worker or None,
        "pid": pid,
        "started_at": started,
        "finished_at": finished,
        "cancel_requested_at": cancel["created"] if cancel else None,
        "stopped_at": cancel["completed_at"] if cancel else None,
        "latency_ms": _latency_ms(cancel) if cancel else None,
        "signals": signals,
    }


def _latency_ms(signal: dict[str, Any]) -> float | None:
    if signal["completed_at"] is None:
        return None
    return round((signal["completed_at"] - signal["created"]).total_seconds() * 1000, 3)


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)  # a result backend that pickles can hold anything
    return value


def send(
    request: HttpRequest,
    task_id: str,
    kind: str,
    message: str,
    wait: float = 0,
    cascade: bool = False,
) -> HttpResponse:
    """Send signal ``kind`` to ``task_id`` for ``request``'s user; with ``wait``, answer once
    the signal is completed or ``wait`` seconds have passed; with ``cascade``, to every task
    it started too."""
    _check_task_id(task_id)
    get_signal_kind(kind)
    ((run_state, signalled, stopped_by),) = _query(sql.task_facts(), {"task_id": task_id})
    if run_state is None and not signalled and not (cascade and _has_descendants(task_id)):
        raise _unknown_task(task_id)
    if kind == CANCEL_TASK and stopped_by is not None:
        # A retried cancel (its first answer lost in an outage) learns how the first one
        # stopped the task, rather than "too late" from a second row.
        stopped = _reread_signal(stopped_by)
        return _signal_answer({**stopped, "already_pending": False, "already_stopped": True})
    # A task that finished gets nothing: the signal is written completed, too late.
    too_late = run_state in RunState.FINISHED
    if not wait or too_late:
        return _signal_answer(_write_signal(request, task_id, kind, message, too_late, cascade))
    deadline = _deadline(wait)
    with waiting.hub.watch(task_id) as waiter:  # before the write: its completion wakes us
        row = _write_signal(request, task_id, kind, message, False, cascade)
        while not row["completed"] and time.monotonic() < deadline:
            _release_connection()
            notice = waiter.wait(
                lambda n: n.get("id") == row["id"], deadline, waiting.client_gone(request)
            )
            if notice is not None:
                row.update(
                    completed=True,
                    outcome=notice["outcome"],
                    completed_at=notice["completed_at"],
                    latency_ms=float(notice["latency_ms"]),
                )
            else:  # the deadline, or the hub asks us to look (its notices may have been lost)
                row.update(_reread_signal(row["id"]))
    return _signal_answer(row)


def _has_descendants(task_id: str) -> bool:
    """Whether tasks were recorded as started by ``task_id`` (a group's id has no run)."""
    return TaskLineage.objects.filter(ancestors__contains=[task_id]).exists()


def _write_signal(
    request: HttpRequest,
    task_id: str,
    kind: str,
    message: str,
    too_late: bool,
    cascade: bool = False,
) -> dict[str, Any]:
    row = CeleryTaskSignal.objects.send(
        task_id,
        kind,
        message,
        requested_by=request.auth,
        finished=too_late,
        source=Source.API,
        cascade=cascade,
    )
    answer = {**_signal_row(row), "already_pending": row.already_pending, "already_stopped": False}
    if cascade:
        answer.update(reached=row.reached, still_to_stop=row.still_to_stop)
    return answer


def _reread_signal(signal_id: int) -> dict[str, Any]:
    return _signal_row(CeleryTaskSignal.objects.get(pk=signal_id))


def _signal_row(row: CeleryTaskSignal) -> dict[str, Any]:
    latency = None
    if row.completed_at is not None:
        latency = round((row.completed_at - row.created).total_seconds() * 1000, 3)
    return {
        "id": row.pk,
        "task_id": row.task_id,
        "signal": row.signal,
        "message": row.message,
        "completed": row.completed,
        "outcome": row.outcome or None,
        "created": row.created,
        "completed_at": row.completed_at,
        "latency_ms": latency,
    }


def _signal_answer(row: dict[str, Any]) -> HttpResponse:
    # 200: done (honoured, or too late); 202: accepted, still to be acted on.
    return json_response(row, 200 if row["completed"] else 202)


SIGNAL_RESPONSES = {200: SignalOut, 202: SignalOut, **WRITE_ERRORS}


@api.post(
    "/tasks/{task_id}/cancel/",
    response=SIGNAL_RESPONSES,
    auth=TokenOrSession(SIGNAL_PERMISSION),
    url_name="task-cancel",
    summary="Cancel a task (optionally waiting for it to stop)",
)
def cancel_task(
    request: HttpRequest,
    task_id: str,
    query: Query[SignalParameters],
    payload: MessageIn | None = None,
) -> HttpResponse:
    """Send ``cancel_task``: the task stops by the escalation ladder. 202 while the cancel is
    pending; 200 once it is completed (with ``wait``, as soon as the task stopped; at once,
    outcome ``too_late``, for a task that had finished).

    Permission: ``tasksignal.add_celerytasksignal``."""
    message = (payload or MessageIn()).message
    return send(request, task_id, CANCEL_TASK, message, query.wait, query.cascade)


@api.post(
    "/tasks/{task_id}/pause/",
    response=SIGNAL_RESPONSES,
    auth=TokenOrSession(SIGNAL_PERMISSION),
    url_name="task-pause",
    summary="Pause a task",
)
def pause_task(
    request: HttpRequest,
    task_id: str,
    query: Query[SignalParameters],
    payload: MessageIn | None = None,
) -> HttpResponse:
    """Send ``pause_task``: the task blocks at its next checkpoint until resumed.

    Permission: ``tasksignal.add_celerytasksignal``."""
    message = (payload or MessageIn()).message
    return send(request, task_id, PAUSE_TASK, message, query.wait, query.cascade)


@api.post(
    "/tasks/{task_id}/resume/",
    response=SIGNAL_RESPONSES,
    auth=TokenOrSession(SIGNAL_PERMISSION),
    url_name="task-resume",
    summary="Resume a paused task",
)
def resume_task(
    request: HttpRequest,
    task_id: str,
    query: Query[SignalParameters],
    payload: MessageIn | None = None,
) -> HttpResponse:
    """Send ``resume_task``: a paused task carries on from its checkpoint.

    Permission: ``tasksignal.add_celerytasksignal``."""
    message = (payload or MessageIn()).message
    return send(request, task_id, RESUME_TASK, message, query.wait, query.cascade)


@api.post(
    "/tasks/{task_id}/signals/",
    response=SIGNAL_RESPONSES,
    auth=TokenOrSession(SIGNAL_PERMISSION),
    url_name="task-signal",
    summary="Send any signal kind",
)
def signal_task(
    request: HttpRequest, task_id: str, payload: SignalIn, query: Query[WaitParameters]
) -> HttpResponse:
    """Send a built-in or registered signal kind (400 naming the known kinds otherwise).

    Permission: ``tasksignal.add_celerytasksignal``."""
    return send(request, task_id, payload.signal, payload.message, query.wait)


@api.post(
    "/cancels/",
    response={200: CancelsOut, **WRITE_ERRORS},
    auth=TokenOrSession(SIGNAL_PERMISSION),
    url_name="cancels",
    summary="Cancel every unfinished run that matches a filter",
)
def cancel_matching(request: HttpRequest, payload: CancelsIn) -> HttpResponse:
    """Cancel the unfinished runs of a task name, in a state, on a worker, started longer
    ago than ``older_than`` (at least one criterion; all given must match), and with
    ``cascade`` every task they started. Only recorded runs are found: those running,
    paused, or queued through the API or the admin.

    Permission: ``tasksignal.add_celerytasksignal``."""
    if all(getattr(payload, name) is None for name in CANCEL_CRITERIA):
        raise ApiError(400, "give at least one of task, state, worker, older_than")
    try:
        age = None if payload.older_than is None else parse_age(payload.older_than)
        runs = runs_matching(payload.task, payload.state, payload.worker, age)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    task_ids = list(runs.values_list("task_id", flat=True))
    reach = send_to_all(
        task_ids,
        CANCEL_TASK,
        payload.message,
        request.auth,
        cascade=payload.cascade,
        source=Source.API,
    )
    body = {
        "matched": len(task_ids),
        "reached": reach.reached,
        "still_to_stop": reach.still_to_stop,
    }
    return json_response(body, 200)


def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    """Any other path under the API: a JSON 404 (never Django's HTML page or a redirect)."""
    return error_response(404, f"no API endpoint at {request.path!r}")


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document as served (JSON: its status codes are strings)."""
    return json.loads(json.dumps(api.get_openapi_schema()))


def get_only(view: View) -> View:
    """Wrap a view that must answer GET (and HEAD) only."""

    @functools.wraps(view)
    def answer(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponseNotAllowed(["GET"])
        return view(request, *args, **kwargs)

    return answer


def json_405(view: View) -> View:
    """Wrap a ninja view so that a method it does not answer gets a JSON 405 with ``Allow``
    (and a query parameter without a name a 400, as any undocumented one)."""

    @functools.wraps(view)
    def answer(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if "" in request.GET:
            # ninja drops a parameter with no name before validation, so extra="forbid"
            # never sees it (``?=false``): unknown parameters are a 400, this one too.
            return error_response(400, "a query parameter has no name")
        response = view(request, *args, **kwargs)
        if response.status_code == 405 and "Allow" in response:
            allowed = ", ".join(sorted(method.strip() for method in response["Allow"].split(",")))
            message = f"method {request.method} not allowed; allowed: {allowed}"
            return error_response(405, message, {"Allow": allowed})
        return response

    return answer
