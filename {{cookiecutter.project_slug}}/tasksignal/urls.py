"""URLs of the tasksignal JSON API, mounted under ``/api/`` (see ``api.py``).

The routes are ninja's (named in the ``tasksignal`` namespace: ``tasksignal:task-detail``),
each answering an undocumented method with a JSON 405 (the module-level names must not be
``app_name``: Django would read it as this URLconf's own); the last pattern answers every
other path under the mount with a JSON 404, so API clients never get Django's HTML error
page or an APPEND_SLASH redirect.
"""

from django.urls import URLPattern, path, re_path

from tasksignal import api

routes, ninja_app, namespace = api.api.urls
for route in routes:
    if not isinstance(route, URLPattern):
        continue
    if route.name == "api-root":  # ninja's docs page, disabled: a JSON 404 like the rest
        route.callback = api.not_found
    elif route.name == "openapi-json":  # ninja answers any method there: GET only
        route.callback = api.get_only(route.callback)
    route.callback = api.json_405(route.callback)

urlpatterns = [
    path("", (routes, ninja_app, namespace)),
    re_path(r"^(?P<path>.*)$", api.not_found, name="not-found"),
]
