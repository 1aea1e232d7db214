"""Housekeeping for signals and run records: expire, settle and purge, in batches."""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from tasksignal import conf
from tasksignal.models import CeleryTaskSignal, TaskRun

BATCH_SIZE = 1000


def sweep() -> dict[str, int]:
    """Settle signals no task will consume and delete rows older than the retention.

    - a pending signal whose task run has finished is completed ``too_late``;
    - a pending signal older than ``TASKSIGNAL_SIGNAL_EXPIRY`` is completed ``expired``
      (its task never showed up);
    - completed signals and finished runs older than ``TASKSIGNAL_RETENTION`` are deleted.

    Returns how many rows each step touched.
    """
    now = timezone.now()
    finished = TaskRun.objects.filter(state__in=TaskRun.FINISHED_STATES).values("task_id")
    too_late = CeleryTaskSignal.objects.pending().filter(task_id__in=finished)
    expiry = timedelta(seconds=conf.get("TASKSIGNAL_SIGNAL_EXPIRY"))
    expired = CeleryTaskSignal.objects.pending().filter(created__lt=now - expiry)
    retention = now - timedelta(seconds=conf.get("TASKSIGNAL_RETENTION"))
    return {
        "too_late": too_late.complete(CeleryTaskSignal.Outcome.TOO_LATE),
        "expired": expired.complete(CeleryTaskSignal.Outcome.EXPIRED),
        "signals_purged": _delete_in_batches(
            CeleryTaskSignal.objects.filter(completed=True, completed_at__lt=retention)
        ),
        "runs_purged": _delete_in_batches(
            TaskRun.objects.filter(state__in=TaskRun.FINISHED_STATES, finished_at__lt=retention)
        ),
    }


def _delete_in_batches(queryset) -> int:
    deleted = 0
    while True:
        with transaction.atomic():
            batch = list(queryset.values_list("pk", flat=True)[:BATCH_SIZE])
            if not batch:
                return deleted
            deleted += queryset.model.objects.filter(pk__in=batch).delete()[0]
