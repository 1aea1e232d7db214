"""The Celery application, configured from Django settings (``CELERY_*``).

Workers start with ``celery -A config worker`` (see ``bin/worker``){% if cookiecutter.use_celery_beat == "y" %}, beat with
``celery -A config beat`` (``bin/beat``){% endif %}.
"""

import os
{%- if cookiecutter.use_celery_beat == "y" %}
from functools import cached_property
{%- endif %}
from pathlib import Path
from typing import Any

from celery import Celery{% if cookiecutter.use_celery_beat == "y" %}, beat, platforms
from celery.apps.beat import Beat{% endif %}
from celery.signals import (
    after_task_publish,
    beat_init,
    heartbeat_sent,
    task_postrun,
    task_prerun,
    worker_init,
)

from tasksignal.node import NodeStep

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

{%- if cookiecutter.use_celery_beat == "y" %}


class GracefulBeat(Beat):
    """``celery beat`` whose SIGTERM (or Ctrl-C) ends its loop and nothing more.

    Celery's own handler closes the scheduler where the signal lands: the schedule file and
    the broker connection. Landing while beat publishes a due task, it breaks that publish
    (a ``SchedulingError`` is logged instead of the exit), beat ticks on over the closed
    schedule file and exits 1. This handler only stops the service; the service saves and
    closes the schedule on its way out of the loop, as after any other exit.
    """

    def install_sync_handler(self, service: beat.Service) -> None:
        """Stop ``service`` on SIGTERM and SIGINT, interrupting whatever it waits for."""

        def stop(_signum: int, _frame: object) -> None:
            service.stop()
            raise SystemExit()

        platforms.signals.update(SIGTERM=stop, SIGINT=stop)


class ProjectCelery(Celery):
    """Celery's application with :class:`GracefulBeat` as what ``celery beat`` runs."""

    @cached_property
    def Beat(self) -> type[Beat]:
        """The ``celery beat`` program, bound to this app."""
        beat_class: type[Beat] = self.subclass_with_self(GracefulBeat)
        return beat_class


app = ProjectCelery("{{ cookiecutter.project_slug }}")
{%- else %}

app = Celery("{{ cookiecutter.project_slug }}")
{%- endif %}
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# In each worker's main process: delivers signals to the pool, escalates, records runs.
app.steps["worker"].add(NodeStep)


#: A task's own sends ride out a Redis restart of up to about 20 s (Celery's default gives
#: up after 0.6 s).
WORKER_PUBLISH_RETRY = {
    "max_retries": 20,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}


@worker_init.connect
def retry_result_writes(sender: Any = None, **_kwargs: object) -> None:
    """In a worker, keep trying to store a result, and to send the tasks a task starts (a
    workflow's chord), while Redis is away (see the settings), so a task that ran does not
    end FAILURE for a Redis restart; the web answers 503 at once instead."""
    sender.app.conf.result_backend_always_retry = True
    sender.app.conf.task_publish_retry_policy = WORKER_PUBLISH_RETRY


@task_prerun.connect
@task_postrun.connect
def close_old_connections(**kwargs: object) -> None:
    """Treat each task like Django treats each request: keep a connection while it is
    usable and younger than ``CONN_MAX_AGE``, check it before reuse (``CONN_HEALTH_CHECKS``).

    Celery's own Django fixup would otherwise close every connection before and after each
    task (a new PostgreSQL connection per task); ``CELERY_DB_REUSE_MAX`` in the settings
    turns that off.
    """
    from django.db import close_old_connections as close

    close()


# Liveness for container health checks (compose.yaml). With CELERY_HEARTBEAT_FILE set, the
# worker's main process touches that file at each event heartbeat (every 2 s while its consumer
# runs and reaches the broker), and beat touches it when it starts and each time it has sent a
# periodic task. A probe then only compares the file's age with a limit: no second process
# importing the project every few seconds.
HEARTBEAT_FILE = os.environ.get("CELERY_HEARTBEAT_FILE", "")


def touch_heartbeat(**_kwargs: object) -> None:
    """Mark this process alive for its container's health check."""
    Path(HEARTBEAT_FILE).touch()


def beat_heartbeat(**_kwargs: object) -> None:
    """In beat: mark it alive now and after every message it publishes."""
    touch_heartbeat()
    after_task_publish.connect(touch_heartbeat, weak=False)


if HEARTBEAT_FILE:
    heartbeat_sent.connect(touch_heartbeat, weak=False)
    beat_init.connect(beat_heartbeat, weak=False)
