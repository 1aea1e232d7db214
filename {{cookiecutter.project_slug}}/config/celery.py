"""The Celery application, configured from Django settings (``CELERY_*``).

Workers start with ``celery -A config worker`` (see ``bin/worker``).
"""

import os

from celery import Celery

from tasksignal.supervisor import CancelSupervisor

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("{{ cookiecutter.project_slug }}")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Runs in each worker's main process: stops cancelled tasks that ignore every softer step.
app.steps["worker"].add(CancelSupervisor)
