"""The Celery application, configured from Django settings (``CELERY_*``).

Workers start with ``celery -A config worker`` (see ``bin/worker``).
"""

import os

from celery import Celery
from celery.signals import task_postrun, task_prerun

from tasksignal.node import NodeStep

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("{{ cookiecutter.project_slug }}")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# In each worker's main process: delivers signals to the pool, escalates, records runs.
app.steps["worker"].add(NodeStep)


@task_prerun.connect
@task_postrun.connect
def close_old_connections(**kwargs) -> None:
    """Treat each task like Django treats each request: keep a connection while it is
    usable and younger than ``CONN_MAX_AGE``, check it before reuse (``CONN_HEALTH_CHECKS``).

    Celery's own Django fixup would otherwise close every connection before and after each
    task (a new PostgreSQL connection per task); ``CELERY_DB_REUSE_MAX`` in the settings
    turns that off.
    """
    from django.db import close_old_connections as close

    close()
