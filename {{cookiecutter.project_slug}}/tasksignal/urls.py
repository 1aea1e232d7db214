"""URLs of the tasksignal JSON API, mounted under ``/api/`` (see ``api.py``, ``openapi.py``).

The last pattern answers every other path under the mount with a JSON 404, so API clients
never get Django's HTML error page or an APPEND_SLASH redirect.
"""

from django.urls import path, re_path

from tasksignal import api

app_name = "tasksignal"
urlpatterns = [
    path("openapi.json", api.openapi_document, name="openapi"),
    path("tasks/", api.start_task, name="task-start"),
    path("tasks/<str:task_id>/", api.task_status, name="task-detail"),
    path("tasks/<str:task_id>/cancel/", api.cancel_task, name="task-cancel"),
    path("tasks/<str:task_id>/pause/", api.pause_task, name="task-pause"),
    path("tasks/<str:task_id>/resume/", api.resume_task, name="task-resume"),
    path("tasks/<str:task_id>/signals/", api.signal_task, name="task-signal"),
    path("tasks/<str:task_id>/revoke/", api.revoke_task, name="task-revoke"),
    re_path(r"^(?P<path>.*)$", api.not_found, name="not-found"),
]
