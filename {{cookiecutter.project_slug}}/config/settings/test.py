"""Settings for the test suite: real PostgreSQL and Redis, isolated queue and channel.

Each test session gets its own Celery queue and signal channel, so it can share a Redis
with other sessions (or a developer's running worker) without stealing their messages.
"""

import uuid

from .base import *  # noqa: F403
from .base import CELERY_BROKER_TRANSPORT_OPTIONS, TASKSIGNAL_STARTABLE_TASKS, env

SECRET_KEY = "django-insecure-test-only"  # noqa: S105
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

_session = uuid.uuid4().hex[:10]
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", default=f"test-{_session}")
TASKSIGNAL_CHANNEL = env("TASKSIGNAL_CHANNEL", default=f"test-{_session}:tasksignal")
# Redelivery tests shorten the visibility timeout (CELERY_VISIBILITY_TIMEOUT); sweep for
# abandoned messages every second so they see it within seconds.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    **CELERY_BROKER_TRANSPORT_OPTIONS,
    "global_keyprefix": env("CELERY_BROKER_KEY_PREFIX", default=f"test-{_session}:"),
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
# The browser tests run gunicorn with these settings (DEBUG off): whitenoise then serves
# the admin's static files straight from the apps, with no collectstatic step.
WHITENOISE_USE_FINDERS = True
# The tests start some of their own tasks through the admin and the API.
TASKSIGNAL_STARTABLE_TASKS = [
    *TASKSIGNAL_STARTABLE_TASKS,
    "tests.tasks.count_with_checkpoints",
    "tests.tasks.echo",
]
