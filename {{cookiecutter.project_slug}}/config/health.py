"""``/healthz``: answers 200 when PostgreSQL and Redis answer, else 503 with the reason.

Its 200 also says how many API clients of the answering process wait for a stop (``wait``).
"""

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from tasksignal.waiting import hub


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return f"postgresql: {exc}".strip()
    return None


def _check_redis() -> str | None:
    try:
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2
        )
        with client:
            client.ping()
    except redis.RedisError as exc:
        return f"redis: {exc}"
    return None


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Report whether this instance can reach its database and its broker, and how many
    API clients of this process wait for a stop."""
    problems = [p for p in (_check_database(), _check_redis()) if p]
    if problems:
        return JsonResponse({"status": "unavailable", "problems": problems}, status=503)
    return JsonResponse({"status": "ok", "waiting": hub.waiting()})
