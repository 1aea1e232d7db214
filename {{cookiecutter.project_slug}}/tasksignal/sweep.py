"""Housekeeping for signals and run records: expire, settle and purge, in batches."""

from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from tasksignal import conf, notify, results, sql
from tasksignal.models import CeleryTaskSignal, TaskLineage, TaskRun, TaskSubject

BATCH_SIZE = 1000
#: An open run record not updated for this long is checked against Celery's result.
STALE_AFTER = timedelta(minutes=5)


def sweep() -> dict[str, int]:
    """Settle signals no task will consume and delete rows older than the retention.

    - a pending signal whose task run has finished is completed ``too_late``;
    - a pending signal older than ``TASKSIGNAL_SIGNAL_EXPIRY`` is completed ``expired``
      (its task never showed up);
    - completed signals and finished runs older than ``TASKSIGNAL_RETENTION`` are deleted,
      and so are the lineage and subject records of tasks published before it (a cascade
      or ``cancel_for`` no longer finds tasks that old);
    - an open run record untouched for ``STALE_AFTER`` whose task Celery reports finished
      is settled (its process was killed before it could write the end of the run).

    Returns how many rows each step touched.
    """
    now = timezone.now()
    settled = _settle_stale_runs(now - STALE_AFTER)
    finished = TaskRun.objects.filter(state__in=TaskRun.FINISHED_STATES).values("task_id")
    too_late = CeleryTaskSignal.objects.pending().filter(task_id__in=finished)
    expiry = timedelta(seconds=conf.get("TASKSIGNAL_SIGNAL_EXPIRY"))
    expired = CeleryTaskSignal.objects.pending().filter(created__lt=now - expiry)
    retention = now - timedelta(seconds=conf.get("TASKSIGNAL_RETENTION"))
    return {
        "runs_settled": settled,
        CeleryTaskSignal.Outcome.TOO_LATE: too_late.complete(CeleryTaskSignal.Outcome.TOO_LATE),
        CeleryTaskSignal.Outcome.EXPIRED: expired.complete(CeleryTaskSignal.Outcome.EXPIRED),
        "signals_purged": _delete_in_batches(
            CeleryTaskSignal.objects.filter(completed=True, completed_at__lt=retention)
        ),
        "runs_purged": _delete_in_batches(
            TaskRun.objects.filter(state__in=TaskRun.FINISHED_STATES, finished_at__lt=retention)
        ),
        "lineage_purged": _delete_in_batches(TaskLineage.objects.filter(created__lt=retention)),
        "subjects_purged": _delete_in_batches(TaskSubject.objects.filter(created__lt=retention)),
    }


def _delete_in_batches(queryset: QuerySet[Any]) -> int:
    deleted = 0
    while True:
        with transaction.atomic():
            batch = list(queryset.values_list("pk", flat=True)[:BATCH_SIZE])
            if not batch:
                return deleted
            deleted += queryset.model.objects.filter(pk__in=batch).delete()[0]


def _settle_stale_runs(before: datetime) -> int:
    stale = TaskRun.objects.exclude(state__in=TaskRun.FINISHED_STATES).filter(updated_at__lt=before)
    task_ids = list(stale.values_list("task_id", flat=True)[:BATCH_SIZE])
    ended = results.ended_states(current_app.backend, task_ids)
    if not ended:
        return 0
    parameters = {"task_ids": list(ended), "states": list(ended.values())}
    with connection.cursor() as cursor:
        cursor.execute(
            sql.settle_ended_runs(), {**parameters, "done_channel": notify.done_channel()}
        )
        return int(cursor.fetchone()[0])
