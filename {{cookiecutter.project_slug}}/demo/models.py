"""The demo's tables: records its transactional task writes, and reports its tasks render."""

from django.db import models


class DemoRecord(models.Model):
    """One row written by ``demo.tasks.write_records``; a cancel rolls back the whole batch."""

    batch = models.CharField(max_length=255, db_index=True)
    number = models.IntegerField()
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.batch}#{self.number}"


class Report(models.Model):
    """Something users make and tasks work on: ``render_report.delay_for(report, ...)``
    ties each task to it, so stopping or deleting a report stops its work."""

    title = models.CharField(max_length=255)
    pages = models.PositiveIntegerField(default=20)
    rendered_pages = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.title

    def render(self) -> str:
        """Start rendering this report; return the task's id."""
        from demo.tasks import render_report

        return render_report.delay_for(self, self.pk).id

    def stop_work(self) -> int:
        """Cancel every task still working on this report (and what they started);
        return how many are still to stop."""
        from tasksignal.models import CeleryTaskSignal

        return CeleryTaskSignal.objects.cancel_for(self).still_to_stop

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        """Delete the report, first stopping the tasks that work on it."""
        self.stop_work()
        return super().delete(*args, **kwargs)
