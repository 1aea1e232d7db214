"""What tasks work on: a task started for a model instance can be cancelled by that instance.

A signal-aware task started with ``delay_for`` / ``apply_async_for`` (``base.py``) records
its subject, a :class:`~tasksignal.models.TaskSubject` row (content type and primary key,
so any model works), in the producer before the message is sent::

    report = Report.objects.create(title="Q3")
    render_report.delay_for(report, pages=40)
    ...
    CeleryTaskSignal.objects.cancel_for(report)   # the user deleted it: stop its work

``cancel_for`` stops every task recorded for the object that is queued or running, and
(by cascade) everything those tasks started. The cost is one INSERT per task started
this way; rows are purged with old runs by the sweep.
"""

from __future__ import annotations

from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import models


def record(task_id: str, obj: models.Model, using: str = "default") -> None:
    """Record that task ``task_id`` works on ``obj`` (one INSERT)."""
    from tasksignal.models import TaskSubject

    content_type = ContentType.objects.db_manager(using).get_for_model(obj)
    TaskSubject.objects.using(using).create(
        task_id=task_id, content_type=content_type, object_id=str(obj.pk)
    )


def task_ids_for(obj: models.Model, using: str = "default") -> list[str]:
    """The ids of the tasks recorded as working on ``obj``, oldest first (one query)."""
    from tasksignal.models import TaskSubject

    content_type = ContentType.objects.db_manager(using).get_for_model(obj)
    rows = TaskSubject.objects.using(using).filter(content_type=content_type, object_id=str(obj.pk))
    return list(rows.order_by("id").values_list("task_id", flat=True))


def subject_options(options: dict[str, Any]) -> str:
    """The task id ``apply_async`` will use: the caller's, or a new one set in ``options``."""
    from celery.utils import uuid

    options.setdefault("task_id", uuid())
    return str(options["task_id"])
