"""Error reporting to Sentry, for the web processes and the Celery worker alike.

Off unless ``SENTRY_DSN`` is set: without it nothing is initialised, nothing is sent and
nothing is patched. With it, ``config/settings/base.py`` calls :func:`init` while Django loads
its settings, which every process of the project does before it handles a request or a task:
gunicorn's workers, and the worker's main process before it forks its pool (the children
inherit the client; sentry-sdk restarts its sending thread after a fork).

What is reported: unhandled exceptions in views and in tasks (with the task's name, id and
arguments' types, never their values), and error log records. A cancelled task is not an
error: it ends in ``RunStopped``, an ``Ignore``, which Celery's integration leaves alone.

Settings (``.env.example`` documents them): ``SENTRY_DSN``, ``SENTRY_ENVIRONMENT``
(default ``production``), ``SENTRY_RELEASE`` (default: none) and
``SENTRY_TRACES_SAMPLE_RATE`` (default 0: no performance tracing, only errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration


def init(environ: Mapping[str, str], **options: Any) -> bool:
    """Start reporting to the DSN in ``environ``; return whether reporting is on.

    ``options`` go to ``sentry_sdk.init`` as they are (tests pass a transport).

    >>> init({})
    False
    >>> init({"SENTRY_DSN": "  "})
    False
    """
    dsn = environ.get("SENTRY_DSN", "").strip()
    if not dsn:
        return False
    rate = environ.get("SENTRY_TRACES_SAMPLE_RATE", "").strip()
    sentry_sdk.init(
        dsn=dsn,
        environment=environ.get("SENTRY_ENVIRONMENT", "").strip() or "production",
        release=environ.get("SENTRY_RELEASE", "").strip() or None,
        traces_sample_rate=float(rate) if rate else 0.0,
        # Personal data (user ids, IPs, cookies, request bodies) stays out of reports.
        send_default_pii=False,
        integrations=[DjangoIntegration(), CeleryIntegration()],
        **options,
    )
    return True
