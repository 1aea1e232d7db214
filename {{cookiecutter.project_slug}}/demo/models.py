"""A table the demo's transactional task writes to."""

from django.db import models


class DemoRecord(models.Model):
    """One row written by ``demo.tasks.write_records``; a cancel rolls back the whole batch."""

    batch = models.CharField(max_length=255, db_index=True)
    number = models.IntegerField()
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.batch}#{self.number}"
