"""App configuration: wires the worker-process hooks when Django is ready."""

from django.apps import AppConfig


class TaskSignalConfig(AppConfig):
    """Registers the in-worker runtime with Celery's worker process signals, and the
    lineage recorder with its publishing signal."""

    name = "tasksignal"
    verbose_name = "Task signals"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tasksignal import lineage, runtime

        runtime.connect_worker_signals()
        lineage.connect()
