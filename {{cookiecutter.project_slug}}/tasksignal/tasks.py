"""Periodic housekeeping, run by Celery beat (see ``CELERY_BEAT_SCHEDULE``)."""

from celery import shared_task

from tasksignal.sweep import sweep as sweep_signals


@shared_task(name="tasksignal.sweep", ignore_result=True)
def sweep() -> dict[str, int]:
    """Expire, settle and purge old signals and run records; see :func:`tasksignal.sweep.sweep`."""
    return sweep_signals()
