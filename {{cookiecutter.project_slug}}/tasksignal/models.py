"""The durable side of task signalling: signal rows and the record of task runs."""

from django.conf import settings
from django.db import connections, models
from django.db.models import Q
from django.db.models.functions import Coalesce, Now

from tasksignal import registry, sql
from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK
from tasksignal.states import Outcome, RunState


class CeleryTaskSignalQuerySet(models.QuerySet):
    """Queries over signals, named for what they mean."""

    def pending(self, task_id: str | None = None, signal: str | None = None):
        """Signals not completed yet, optionally for one task and/or of one kind."""
        qs = self.filter(completed=False)
        if task_id is not None:
            qs = qs.filter(task_id=task_id)
        if signal is not None:
            qs = qs.filter(signal=signal)
        return qs

    def complete(self, outcome: str) -> int:
        """Mark these pending signals completed with ``outcome``, stamped by the database clock.

        Returns how many rows this call completed; a row another process completed first is
        left alone, which is what makes completion happen exactly once.
        """
        return self.filter(completed=False).update(
            completed=True,
            outcome=outcome,
            completed_at=Now(),
            acknowledged_at=Coalesce("acknowledged_at", Now()),
            modified=Now(),
        )


class CeleryTaskSignalManager(models.Manager.from_queryset(CeleryTaskSignalQuerySet)):
    """Sends signals: one statement writes the row and announces it to the workers."""

    def send(
        self,
        task_id: str,
        signal: str,
        message: str = "",
        requested_by=None,
        *,
        finished: bool = False,
    ):
        """Ask the task ``task_id`` to act on ``signal``; return the signal row.

        Sending a signal that is already pending for the task returns the existing row
        (at most one pending signal per task and kind); ``row.already_pending`` says which
        happened. For a task known to have ``finished``, the row is written completed,
        ``too_late``, and no worker is told. Raises
        :class:`~tasksignal.exceptions.UnknownSignal` for an unregistered kind. The worker
        running the task hears of it when the row commits (inside your own transaction:
        when that transaction commits).
        """
        registry.get_signal_kind(signal)
        # Inserting and then reading back on conflict costs one round trip in the usual
        # case, where get_or_create in a savepoint costs five; a row completed between the
        # two statements makes room for a new one, hence the second attempt.
        for _attempt in range(3):
            row = self._insert(task_id, signal, message, requested_by, finished)
            if row is not None:
                return row
            row = self.pending(task_id, signal).first()
            if row is not None:
                row.already_pending = True
                return row
        raise RuntimeError(f"could not send {signal} to {task_id}: the pending row kept changing")

    def _insert(self, task_id, signal, message, requested_by, finished):
        """INSERT the row unless one is pending; return it, or None on conflict."""
        from tasksignal.notify import signal_channel

        requested_by_id = getattr(requested_by, "pk", requested_by)
        with connections[self.db].cursor() as cursor:
            cursor.execute(
                sql.insert_signal(),
                {
                    "task_id": task_id,
                    "signal": signal,
                    "message": message,
                    "requested_by": requested_by_id,
                    "channel": signal_channel(task_id),
                    "too_late": finished,
                },
            )
            inserted = cursor.fetchone()
        if inserted is None:
            return None
        row_id, created, modified, completed, completed_at, _ = inserted
        row = self.model(
            id=row_id,
            task_id=task_id,
            signal=signal,
            message=message,
            requested_by_id=requested_by_id,
            created=created,
            modified=modified,
            completed=completed,
            outcome=Outcome.TOO_LATE if completed else "",
            acknowledged_at=completed_at,
            completed_at=completed_at,
        )
        row._state.adding = False
        row._state.db = self.db
        row.already_pending = False
        return row

    def send_many(self, task_ids, signal: str, message: str = "", requested_by=None) -> list:
        """Send ``signal`` to each of ``task_ids``; return the pending rows, one per task."""
        return [self.send(task_id, signal, message, requested_by) for task_id in task_ids]

    def cancel(self, task_id: str, message: str = "", requested_by=None):
        """Send ``cancel_task``: the task stops, cleaning up, by the escalation ladder."""
        return self.send(task_id, CANCEL_TASK, message, requested_by)

    def pause(self, task_id: str, message: str = "", requested_by=None):
        """Send ``pause_task``: the task blocks at its next checkpoint until resumed."""
        return self.send(task_id, PAUSE_TASK, message, requested_by)

    def resume(self, task_id: str, message: str = "", requested_by=None):
        """Send ``resume_task``: a paused task carries on from its checkpoint."""
        return self.send(task_id, RESUME_TASK, message, requested_by)


class CeleryTaskSignal(models.Model):
    """A request to a (running or future) Celery task, and what became of it.

    The row is the source of truth: notifications only make delivery fast. ``created``
    and ``completed_at`` come from the database clock, so their difference is the
    signal's latency whatever the clocks of the machines involved.
    """

    CANCEL_TASK = CANCEL_TASK
    PAUSE_TASK = PAUSE_TASK
    RESUME_TASK = RESUME_TASK

    #: The names of every outcome (``tasksignal.states.Outcome``).
    Outcome = Outcome

    task_id = models.CharField(max_length=255, db_index=True)
    signal = models.CharField(max_length=32, choices=registry.signal_choices)
    message = models.TextField(blank=True, help_text="Optional text for the task to read.")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    completed = models.BooleanField(default=False)
    outcome = models.CharField(max_length=16, choices=Outcome.CHOICES, blank=True)
    error = models.CharField(
        max_length=255, blank=True, help_text="Why a registered handler failed, if it did."
    )
    created = models.DateTimeField(db_default=Now(), editable=False)
    modified = models.DateTimeField(db_default=Now(), editable=False)
    acknowledged_at = models.DateTimeField(null=True, blank=True, editable=False)
    completed_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = CeleryTaskSignalManager()

    class Meta:
        ordering = ["modified"]
        constraints = [
            models.UniqueConstraint(
                fields=["task_id", "signal"],
                condition=Q(completed=False),
                name="tasksignal_one_pending_signal_per_task",
                violation_error_message="This signal is already pending for this task.",
            )
        ]
        indexes = [
            models.Index(
                fields=["created"], condition=Q(completed=False), name="tasksignal_pending"
            ),
        ]

    def __str__(self) -> str:
        state = self.outcome or ("completed" if self.completed else "pending")
        return f"{self.signal} → {self.task_id} ({state})"

    def mark_completed(self, outcome: str = Outcome.HANDLED, save: bool = True) -> bool:
        """Complete this signal with ``outcome``; return False if it was already completed.

        With ``save=False`` only the instance changes (for callers that save it
        themselves); with ``save=True`` the update is conditional, so it happens once.
        """
        if self.completed:
            return False
        if save:
            done = type(self).objects.filter(pk=self.pk).complete(outcome) == 1
            self.refresh_from_db()
            return done
        from django.utils import timezone

        now = timezone.now()
        self.completed, self.outcome, self.completed_at = True, outcome, now
        self.acknowledged_at = self.acknowledged_at or now
        return True


class TaskRun(models.Model):
    """What a signal-aware task run is doing, for operators (admin, API, command line).

    Written from the worker in batches four times a second, not once per event, so it
    costs the task nothing it would notice; it can lag the task by that much. A run that
    starts and succeeds between two writes leaves no row of its own (it was never visible
    as running); it only updates a row that already existed, such as the ``queued`` row the
    API creates. Runs that last longer, fail, pause or are cancelled are always recorded.
    """

    #: The names of every run state (``tasksignal.states.RunState``).
    State = RunState
    FINISHED_STATES = tuple(sorted(RunState.FINISHED))

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255, db_index=True)
    state = models.CharField(max_length=16, choices=RunState.CHOICES, db_index=True)
    worker = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    progress_current = models.FloatField(null=True, blank=True)
    progress_total = models.FloatField(null=True, blank=True)
    progress_message = models.CharField(max_length=255, blank=True)
    error = models.CharField(max_length=1000, blank=True, help_text="Why the run failed.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.task_name} {self.task_id} ({self.state})"

    @property
    def progress(self) -> float | None:
        """Fraction done, 0..1, when the task reported a total."""
        if self.progress_current is None or not self.progress_total:
            return None
        return min(1.0, self.progress_current / self.progress_total)


class ApiToken(models.Model):
    """A bearer token for the JSON API, acting as its user with that user's permissions.

    Only the SHA-256 of the secret is stored: the secret is shown once, when the token is
    made (``manage.py create_api_token``), and cannot be read back. A fast hash is enough
    because the secret is 256 random bits, not a password a person chose; it also lets a
    request find its token with one indexed lookup. Delete the row to revoke the token.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tasksignal_api_tokens"
    )
    name = models.CharField(max_length=100, blank=True, help_text="What the token is for.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The secret's first characters, to recognise it."
    )
    created = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        verbose_name = "API token"
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'}, {self.user})"
