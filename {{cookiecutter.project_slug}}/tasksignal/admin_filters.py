"""The task-run list's filters: by cancel outcome, by age, and by task or worker.

Each filter is served by an index, so the list stays fast on a table of 100,000 runs and
more. Django's own filter for a plain column lists its values with ``SELECT DISTINCT``,
which reads the whole table (or index) on every page view; the task and worker filters
here list them with a *skip scan* instead: one index probe per distinct value (there are
few tasks and few workers, many runs).
"""

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.db import connection
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import Outcome

#: Most values a task or worker filter lists (the rest stay reachable by search).
MAX_FILTER_VALUES = 100


def distinct_values(column: str, limit: int = MAX_FILTER_VALUES) -> list[str]:
    """The distinct non-empty values of ``TaskRun.<column>``, sorted, by a skip scan.

    ``column`` must have a B-tree index of its own (``task_name`` and ``worker`` do): the
    recursive query asks that index for the next value greater than the last one, so its
    cost follows the number of distinct values, not of rows.
    """
    quote = connection.ops.quote_name
    table = quote(TaskRun._meta.db_table)
    name = quote(TaskRun._meta.get_field(column).column)
    statement = f"""
        WITH RECURSIVE found(value) AS (
            (SELECT {name} FROM {table} WHERE {name} > '' ORDER BY {name} LIMIT 1)
            UNION ALL
            SELECT (SELECT {name} FROM {table} WHERE {name} > found.value ORDER BY {name}
                    LIMIT 1)
            FROM found WHERE found.value IS NOT NULL
        )
        SELECT value FROM found WHERE value IS NOT NULL LIMIT %s
    """  # noqa: S608 - names come from the model, quoted; the limit is a parameter
    with connection.cursor() as cursor:
        cursor.execute(statement, [limit])
        return [row[0] for row in cursor.fetchall()]


class DistinctValueFilter(admin.SimpleListFilter):
    """Filter on one indexed column by its exact value, listing the values by skip scan."""

    column = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """Every distinct value of the column (up to :data:`MAX_FILTER_VALUES`)."""
        return [(value, value) for value in distinct_values(self.column)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        """Runs whose column is the chosen value."""
        if self.value() is None:
            return queryset
        return queryset.filter(**{self.column: self.value()})


class TaskNameFilter(DistinctValueFilter):
    """Runs of one task."""

    title = "task"
    parameter_name = "task"
    column = "task_name"


class WorkerFilter(DistinctValueFilter):
    """Runs on one worker node."""

    title = "worker"
    parameter_name = "worker"
    column = "worker"


class CancelOutcomeFilter(admin.SimpleListFilter):
    """Runs by how their cancel ended: a rung of the ladder, pending, or never cancelled."""

    title = "cancel outcome"
    parameter_name = "outcome"
    PENDING = "pending"
    NONE = "none"

    HINTS = {
        Outcome.SKIPPED: "skipped (never started)",
        Outcome.COOPERATIVE: "cooperative (at a checkpoint)",
        Outcome.INTERRUPTED: "interrupted (no checkpoint in time)",
        Outcome.KILLED: "killed (its process)",
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """The four rungs of the ladder, a cancel pending, and never cancelled."""
        rungs = [(rung, self.HINTS.get(rung, rung)) for rung in Outcome.LADDER]
        return [*rungs, (self.PENDING, "cancel pending"), (self.NONE, "never cancelled")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        """Runs with a cancel of that outcome (by the partial index on cancels' outcomes)."""
        value = self.value()
        if value is None:
            return queryset
        cancels = CeleryTaskSignal.objects.filter(signal=CANCEL_TASK)
        if value == self.NONE:
            return queryset.exclude(task_id__in=cancels.values("task_id"))
        if value == self.PENDING:
            return queryset.filter(task_id__in=cancels.pending().values("task_id"))
        return queryset.filter(task_id__in=cancels.filter(outcome=value).values("task_id"))


class AgeFilter(admin.SimpleListFilter):
    """Runs by when they started (by the ``started_at`` index)."""

    title = "started"
    parameter_name = "age"
    AGES = {
        "5m": ("in the last 5 minutes", timedelta(minutes=5)),
        "1h": ("in the last hour", timedelta(hours=1)),
        "1d": ("in the last 24 hours", timedelta(days=1)),
        "7d": ("in the last 7 days", timedelta(days=7)),
    }
    OLDER = "older"
    NOT_STARTED = "not-started"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """Recent windows, older than a week, and not started yet (queued)."""
        return [
            *((key, label) for key, (label, _) in self.AGES.items()),
            (self.OLDER, "more than 7 days ago"),
            (self.NOT_STARTED, "not started yet"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        """Runs started within the chosen window."""
        value = self.value()
        if value is None:
            return queryset
        if value == self.NOT_STARTED:
            return queryset.filter(started_at__isnull=True)
        if value == self.OLDER:
            return queryset.filter(started_at__lt=timezone.now() - self.AGES["7d"][1])
        if value in self.AGES:
            return queryset.filter(started_at__gte=timezone.now() - self.AGES[value][1])
        return queryset
