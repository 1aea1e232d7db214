"""The load test's URLconf: the project's, plus the baseline it measures tasksignal against.

``POST /loadtest/tasks/<id>/revoke/`` calls Celery's ``revoke(id, terminate=True,
signal="SIGKILL")``: no cleanup, no proof that the task stopped, maybe another task killed.
It exists so the storm can compare it with a cancel, and only the load test's server mounts
it (``loadtest/run.py`` sets ``DJANGO_ROOT_URLCONF=loadtest.baseline``); the production API
does not have it. It takes the API's credentials and signal permission and answers the
database time of the request, ``{"id": ..., "revoked_at": ...}``.
"""

import kombu.exceptions
from celery import current_app
from django.db import DatabaseError, connection
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from config.urls import urlpatterns as project_urlpatterns
from tasksignal.api import (
    SIGNAL_PERMISSION,
    ApiError,
    TokenOrSession,
    error_response,
    json_response,
)
from tasksignal.auth import AuthenticationFailed
from tasksignal.control import celery_revoke

_require_signal_permission = TokenOrSession(SIGNAL_PERMISSION)


@csrf_exempt  # TokenOrSession checks CSRF for session requests
@require_POST
def revoke(request, task_id: str):
    """Revoke ``task_id`` the way Celery offers: terminate its process with SIGKILL."""
    try:
        _require_signal_permission(request)
    except AuthenticationFailed as exc:
        return error_response(401, exc.message, {"WWW-Authenticate": exc.challenge})
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            (revoked_at,) = cursor.fetchone()
        # Celery's own handler: app.control.revoke would go through tasksignal.
        celery_revoke(current_app, task_id, terminate=True, signal="SIGKILL")
    except (DatabaseError, kombu.exceptions.OperationalError):
        # What the API answers when a server is down; the fault run asks again.
        return error_response(503, "a server is unavailable; try again")
    return json_response({"id": task_id, "revoked_at": revoked_at}, 202)


urlpatterns = [
    path("loadtest/tasks/<str:task_id>/revoke/", revoke, name="loadtest-revoke"),
    *project_urlpatterns,
]
