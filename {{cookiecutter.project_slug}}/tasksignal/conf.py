"""Settings of the tasksignal app, with their defaults, read when used (never at import).

``TASKSIGNAL_CANCEL_GRACE``
    Seconds a task has after a cancel to reach a checkpoint before it is interrupted.
``TASKSIGNAL_KILL_AFTER``
    Seconds after a cancel at which a task still running is killed (prefork only).
``TASKSIGNAL_RECONCILE_INTERVAL``
    Seconds between a worker node's reads of its tasks' pending signals, which cover
    notifications missed while it was disconnected from PostgreSQL.
``TASKSIGNAL_CHANNEL``
    A name that keeps this service's notification channels apart from those of other
    services using the same database.
``TASKSIGNAL_RECORD_RUNS``
    Keep a :class:`~tasksignal.models.TaskRun` record of each signal-aware run.
``TASKSIGNAL_SIGNAL_EXPIRY``
    Seconds after which a pending signal for a task that never ran is expired.
``TASKSIGNAL_RETENTION``
    Seconds completed signals and finished runs are kept before the sweep deletes them.
``TASKSIGNAL_STARTABLE_TASKS``
    Task names the JSON API may start.
``TASKSIGNAL_TOKEN_CACHE_SECONDS``
    Seconds a web process remembers the user behind an API token (and its permissions):
    a revoked token or a deactivated user stops working within that time.
``TASKSIGNAL_MAX_WAIT``
    Longest ``wait`` (seconds) an API client may ask for.
"""

from typing import Any

from django.conf import settings

DEFAULTS = {
    "TASKSIGNAL_CANCEL_GRACE": 1.0,
    "TASKSIGNAL_KILL_AFTER": 5.0,
    "TASKSIGNAL_RECONCILE_INTERVAL": 2.0,
    "TASKSIGNAL_CHANNEL": "tasksignal",
    "TASKSIGNAL_RECORD_RUNS": True,
    "TASKSIGNAL_SIGNAL_EXPIRY": 24 * 3600.0,
    "TASKSIGNAL_RETENTION": 7 * 24 * 3600.0,
    "TASKSIGNAL_STARTABLE_TASKS": (),
    "TASKSIGNAL_TOKEN_CACHE_SECONDS": 5.0,
    "TASKSIGNAL_MAX_WAIT": 60.0,
}


def get(name: str) -> Any:
    """Return the setting ``name``, or its default from :data:`DEFAULTS`."""
    return getattr(settings, name, DEFAULTS[name])
