"""The OpenAPI 3 document of the JSON API, served at ``GET /api/openapi.json``.

Written by hand next to the views (``api.py``) rather than generated, and kept honest by
tests: one compares every route and method of ``urls.py`` with this document, and a
schemathesis run fuzzes every operation and checks each answer against it. Paths come
from ``reverse()``, enums from the models, so neither can drift. The document is built
once per process, on first use, and served from memory afterwards.
"""

import functools
import json

from django.conf import settings
from django.urls import reverse

from tasksignal.models import CeleryTaskSignal, TaskRun

TASK_ID_PLACEHOLDER = "TASKID"
#: Text PostgreSQL can store: anything but the NUL character (the API answers 400 to it).
TEXT = {"type": "string", "pattern": "^[^\\u0000]*$"}


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _path(name: str, *, task_id: bool = True) -> str:
    """The OpenAPI path template of the route ``tasksignal:<name>``, from the URLconf."""
    if not task_id:
        return reverse(f"tasksignal:{name}")
    url = reverse(f"tasksignal:{name}", kwargs={"task_id": TASK_ID_PLACEHOLDER})
    return url.replace(TASK_ID_PLACEHOLDER, "{task_id}")


ERRORS = {
    "BadRequest": "The body is not a JSON object of the documented shape, or names a task or "
    "signal that is not allowed.",
    "Unauthorized": "No credentials, or a token that does not exist or belongs to an inactive "
    "user.",
    "Forbidden": "The user lacks the permission the operation needs, or a session request "
    "failed the CSRF check.",
    "NotFound": "No task with this id is known (no run record, no signal, and for a status "
    "read no result in Celery's backend), or the endpoint is disabled.",
    "PayloadTooLarge": "The body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE.",
    "ServiceUnavailable": "PostgreSQL or Redis (broker, result backend) cannot be reached; "
    "retry later.",
}


def _schemas() -> dict:
    timestamp = {"type": "string", "format": "date-time"}
    nullable_timestamp = {**timestamp, "nullable": True}
    outcome = {
        "type": "string",
        "nullable": True,
        "enum": [*(value for value, _ in CeleryTaskSignal.Outcome.CHOICES), None],
        "description": "How the signal ended; null while it is pending.",
    }
    signal_fields = {
        "id": {"type": "integer"},
        "signal": {"type": "string", "example": CeleryTaskSignal.CANCEL_TASK},
        "completed": {"type": "boolean"},
        "outcome": outcome,
        "created": {**timestamp, "description": "When it was sent (database clock)."},
        "completed_at": {**nullable_timestamp, "description": "When it was completed."},
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "StartRequest": {
            "type": "object",
            "required": ["task"],
            "additionalProperties": False,
            "properties": {
                "task": {
                    **TEXT,
                    "description": "A task name listed in the TASKSIGNAL_STARTABLE_TASKS "
                    "setting; any other name is answered with 400.",
                    "example": "yourapp.tasks.import_rows",
                },
                "kwargs": {
                    "type": "object",
                    "additionalProperties": True,
                    "description": "Keyword arguments of the task. Arguments the task does not "
                    "accept make the task fail in the worker, not this request.",
                    "example": {"steps": 50},
                },
            },
        },
        "StartedTask": {
            "type": "object",
            "required": ["id", "task", "state"],
            "properties": {
                "id": {"type": "string", "description": "The Celery task id."},
                "task": {"type": "string"},
                "state": {"type": "string", "enum": [TaskRun.State.QUEUED]},
            },
        },
        "SignalRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "message": {**TEXT, "description": "Text the task can read."},
            },
        },
        "CustomSignalRequest": {
            "type": "object",
            "required": ["signal"],
            "additionalProperties": False,
            "properties": {
                "signal": {
                    **TEXT,
                    "description": "A built-in or registered signal kind.",
                    "example": CeleryTaskSignal.CANCEL_TASK,
                },
                "message": {**TEXT, "description": "Text the task can read."},
            },
        },
        "Signal": {
            "type": "object",
            "required": ["task_id", *signal_fields],
            "properties": {"task_id": {"type": "string"}, **signal_fields},
        },
        "SignalSummary": {
            "type": "object",
            "required": list(signal_fields),
            "properties": signal_fields,
        },
        "TaskStatus": {
            "type": "object",
            "required": [
                "id",
                "task",
                "state",
                "run_state",
                "result",
                "outcome",
                "progress",
                "paused",
                "cancel_requested_at",
                "stopped_at",
                "latency_ms",
                "signals",
            ],
            "properties": {
                "id": {"type": "string"},
                "task": {
                    "type": "string",
                    "nullable": True,
                    "description": "Task name; null when only signals are known.",
                },
                "state": {
                    "type": "string",
                    "description": "Celery state from the result backend: PENDING, STARTED, "
                    "SUCCESS, FAILURE, RETRY, REVOKED or a custom state.",
                },
                "run_state": {
                    "type": "string",
                    "nullable": True,
                    "enum": [*(value for value, _ in TaskRun.State.CHOICES), None],
                    "description": "State of the run record; null when there is none.",
                },
                "result": {"description": "The task's return value once SUCCESS, else null."},
                "outcome": {**outcome, "description": "Outcome of the latest cancel, or null."},
                "progress": {"type": "number", "nullable": True, "minimum": 0, "maximum": 1},
                "paused": {"type": "boolean"},
                "cancel_requested_at": {
                    **nullable_timestamp,
                    "description": "When the latest cancel was sent (database clock).",
                },
                "stopped_at": {
                    **nullable_timestamp,
                    "description": "When the latest cancel was completed (database clock).",
                },
                "latency_ms": {
                    "type": "number",
                    "nullable": True,
                    "description": "stopped_at - cancel_requested_at, in milliseconds.",
                },
                "signals": {"type": "array", "items": _ref("schemas", "SignalSummary")},
            },
        },
        "Revoked": {
            "type": "object",
            "required": ["id", "revoked_at"],
            "properties": {
                "id": {"type": "string"},
                "revoked_at": {**timestamp, "description": "Database clock before the revoke."},
            },
        },
    }


START_ERRORS = ("BadRequest", "Unauthorized", "Forbidden", "PayloadTooLarge", "ServiceUnavailable")


def _operation(summary: str, responses: dict, *, errors: tuple[str, ...], **extra) -> dict:
    responses = dict(responses)
    codes = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "Forbidden": "403",
        "NotFound": "404",
        "PayloadTooLarge": "413",
        "ServiceUnavailable": "503",
    }
    for name in errors:
        responses[codes[name]] = _ref("responses", name)
    return {"summary": summary, "responses": responses, **extra}


def build_document() -> dict:
    """Build the OpenAPI document (use :func:`document_bytes`, which builds it once)."""
    task_id = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "description": "The Celery task id.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }
    read = ("Unauthorized", "Forbidden", "NotFound", "ServiceUnavailable")
    write = ("BadRequest", "PayloadTooLarge", *read)
    signal_body = {
        "required": False,
        "content": {"application/json": {"schema": _ref("schemas", "SignalRequest")}},
    }
    signal_sent = {"202": _json(_ref("schemas", "Signal"), "The pending signal (idempotent).")}

    def signal_operation(verb: str, what: str) -> dict:
        return _operation(
            f"{verb.capitalize()} a task",
            signal_sent,
            errors=write,
            description=f"{what} Sending it again while it is pending returns the same "
            "signal. Needs the tasksignal.add_celerytasksignal permission.",
            operationId=f"{verb}_task",
            parameters=[task_id],
            requestBody=signal_body,
            tags=["signals"],
        )

    paths = {
        _path("openapi", task_id=False): {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "tags": ["meta"],
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
            }
        },
        _path("task-start", task_id=False): {
            "post": _operation(
                "Start a task",
                {
                    "202": _json(
                        _ref("schemas", "StartedTask"),
                        "Queued: the run record exists, the message is on the broker.",
                        {
                            "Location": {
                                "description": "URL of the task's status.",
                                "schema": {"type": "string"},
                            }
                        },
                    )
                },
                errors=START_ERRORS,
                description="Queues one of the tasks in TASKSIGNAL_STARTABLE_TASKS. Needs the "
                "tasksignal.add_taskrun permission.",
                operationId="start_task",
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("schemas", "StartRequest")}},
                },
                tags=["tasks"],
            )
        },
        _path("task-detail"): {
            "get": _operation(
                "Status of a task",
                {"200": _json(_ref("schemas", "TaskStatus"), "The task's state and signals.")},
                errors=read,
                description="Needs the tasksignal.view_taskrun permission.",
                operationId="get_task",
                parameters=[task_id],
                tags=["tasks"],
            )
        },
        _path("task-cancel"): {
            "post": signal_operation("cancel", "Stops the task by the escalation ladder.")
        },
        _path("task-pause"): {
            "post": signal_operation("pause", "Blocks the task at its next checkpoint.")
        },
        _path("task-resume"): {"post": signal_operation("resume", "Lets a paused task carry on.")},
        _path("task-signal"): {
            "post": _operation(
                "Send any signal",
                signal_sent,
                errors=write,
                description="Sends a built-in or registered signal kind by name. Needs the "
                "tasksignal.add_celerytasksignal permission.",
                operationId="signal_task",
                parameters=[task_id],
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("schemas", "CustomSignalRequest")}
                    },
                },
                tags=["signals"],
            )
        },
        _path("task-revoke"): {
            "post": _operation(
                "Benchmark only: Celery's revoke(terminate=True)",
                {"202": _json(_ref("schemas", "Revoked"), "The revoke was broadcast.")},
                errors=("Unauthorized", "Forbidden", "NotFound", "ServiceUnavailable"),
                description="The baseline the load test compares signals with: "
                "app.control.revoke(id, terminate=True, signal='SIGKILL'), no cleanup, no "
                "proof the task stopped. Answers 404 unless TASKSIGNAL_API_BASELINE_REVOKE "
                "is True. Needs the tasksignal.add_celerytasksignal permission.",
                operationId="revoke_task",
                parameters=[task_id],
                tags=["benchmark"],
            )
        },
    }
    responses = {
        name: _json(_ref("schemas", "Error"), description) for name, description in ERRORS.items()
    }
    responses["Unauthorized"]["headers"] = {
        "WWW-Authenticate": {"description": "Always 'Bearer'.", "schema": {"type": "string"}}
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Task signals API",
            "version": "1",
            "description": "Start Celery tasks, cancel, pause and resume them while they run, "
            "and read what became of them. Every error is a JSON object "
            '{"error": "<message>"}; a method an endpoint does not support is answered '
            "with 405 and an Allow header; an unknown path under the API with 404.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "responses": responses,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `manage.py create_api_token <username>`.",
                },
                "sessionAuth": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": settings.SESSION_COOKIE_NAME,
                    "description": "A logged-in Django session; unsafe methods also need the "
                    "CSRF token in X-CSRFToken.",
                },
            },
        },
        "security": [{"bearerAuth": []}, {"sessionAuth": []}],
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as JSON, built on first use and kept for the life of the process."""
    return json.dumps(build_document()).encode()
