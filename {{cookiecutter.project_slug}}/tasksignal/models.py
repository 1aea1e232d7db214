"""The durable side of task signalling: signal rows and the record of task runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.contrib.postgres.expressions import ArraySubquery
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import connections, models
from django.db.models import DurationField, ExpressionWrapper, F, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, Now

from tasksignal import cascade, registry, sql, subjects
from tasksignal.cascade import Reach
from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK
from tasksignal.states import Outcome, RunState, Source


class CeleryTaskSignalQuerySet(models.QuerySet["CeleryTaskSignal"]):
    """Queries over signals, named for what they mean."""

    def pending(
        self, task_id: str | None = None, signal: str | None = None
    ) -> CeleryTaskSignalQuerySet:
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


_SignalManagerBase = models.Manager.from_queryset(CeleryTaskSignalQuerySet)


class CeleryTaskSignalManager(_SignalManagerBase["CeleryTaskSignal"]):
    """Sends signals: one statement writes the row and announces it to the workers."""

    def send(
        self,
        task_id: str,
        signal: str,
        message: str = "",
        requested_by: Any = None,
        *,
        finished: bool = False,
        source: str = Source.CODE,
        cascade: bool = False,
    ) -> CeleryTaskSignal:
        """Ask the task ``task_id`` to act on ``signal``; return the signal row.

        With ``cascade=True`` the signal also goes to every task ``task_id`` started,
        directly or through any depth of chains, groups and chords (``task_id`` may be a
        group's id), and a cancel reaches the tasks they start later too
        (``tasksignal/cascade.py``); ``row.reached`` and ``row.still_to_stop`` then say how
        many tasks the signal reached and how many of those have not finished.

        Sending a signal that is already pending for the task returns the existing row
        (at most one pending signal per task and kind); ``row.already_pending`` says which
        happened. For a task known to have ``finished``, the row is written completed,
        ``too_late``, and no worker is told. ``source`` records how it was sent (a
        :class:`~tasksignal.states.Source`: admin, API, command line, code). Raises
        :class:`~tasksignal.exceptions.UnknownSignal` for an unregistered kind. The worker
        running the task hears of it when the row commits (inside your own transaction:
        when that transaction commits).
        """
        registry.get_signal_kind(signal)
        if cascade:
            from tasksignal.cascade import send_cascade

            return send_cascade(self, task_id, signal, message, requested_by, finished, source)
        return self._send(task_id, signal, message, requested_by, finished, source)

    def _send(
        self,
        task_id: str,
        signal: str,
        message: str,
        requested_by: Any,
        finished: bool,
        source: str,
        cascade: bool = False,
    ) -> CeleryTaskSignal:
        # Inserting and then reading back on conflict costs one round trip in the usual
        # case, where get_or_create in a savepoint costs five; a row completed between the
        # two statements makes room for a new one, hence the second attempt.
        for _attempt in range(3):
            row = self._insert(task_id, signal, message, requested_by, finished, source, cascade)
            if row is not None:
                return row
            row = self.pending(task_id, signal).first()
            if row is not None:
                row.already_pending = True
                return row
        raise RuntimeError(f"could not send {signal} to {task_id}: the pending row kept changing")

    def _insert(
        self,
        task_id: str,
        signal: str,
        message: str,
        requested_by: Any,
        finished: bool,
        source: str,
        cascade: bool = False,
    ) -> CeleryTaskSignal | None:
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
                    "source": source,
                    "channel": signal_channel(task_id),
                    "too_late": finished,
                    "cascade": cascade,
                },
            )
            inserted = cursor.fetchone()
        if inserted is None:
            return None
        row_id, created, modified, completed, completed_at, _ = inserted
        row: CeleryTaskSignal = self.model(
            id=row_id,
            task_id=task_id,
            signal=signal,
            message=message,
            requested_by_id=requested_by_id,
            source=source,
            cascade=cascade,
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

    def send_many(
        self,
        task_ids: Iterable[str],
        signal: str,
        message: str = "",
        requested_by: Any = None,
        **options: Any,
    ) -> list[CeleryTaskSignal]:
        """Send ``signal`` to each of ``task_ids``; return the pending rows, one per task.

        ``options`` are :meth:`send`'s keywords (``source``)."""
        return [
            self.send(task_id, signal, message, requested_by, **options) for task_id in task_ids
        ]

    def cancel(
        self, task_id: str, message: str = "", requested_by: Any = None, **options: Any
    ) -> CeleryTaskSignal:
        """Send ``cancel_task``: the task stops, cleaning up, by the escalation ladder.

        ``cascade=True`` cancels everything the task started too (:meth:`send`)."""
        return self.send(task_id, CANCEL_TASK, message, requested_by, **options)

    def cancel_result(self, result: Any, message: str = "", **options: Any) -> Reach:
        """Cancel the tasks of a Celery result (``AsyncResult``, ``GroupResult``, a chain's
        or a chord's) and what they started (``cascade.cancel_result``)."""
        return cascade.cancel_result(result, message, using=self.db, **options)

    def cancel_for(self, obj: models.Model, message: str = "", **options: Any) -> Reach:
        """Cancel every task started with ``delay_for(obj)`` / ``apply_async_for(obj)``
        and what they started: what an app does when ``obj`` is deleted or its user
        presses stop. Finished tasks are left alone (``too_late``).

        ``options``: ``requested_by``, ``source``, ``cascade`` (default true)."""
        task_ids = subjects.task_ids_for(obj, using=self.db)
        return cascade.send_to_all(task_ids, CANCEL_TASK, message, using=self.db, **options)

    def cancel_runs(self, runs: TaskRunQuerySet, message: str = "", **options: Any) -> Reach:
        """Cancel the unfinished runs of ``runs``, a filter of :class:`TaskRun` (by name,
        state, worker, age), and what they started. Only recorded runs are found: those
        running, paused, or queued by the API or the admin.

        >>> from datetime import timedelta
        >>> from django.utils import timezone
        >>> old = timezone.now() - timedelta(hours=1)
        >>> runs = TaskRun.objects.filter(task_name="reports.tasks.render", started_at__lt=old)
        >>> CeleryTaskSignal.objects.cancel_runs(runs).reached  # doctest: +SKIP
        3
        """
        task_ids = list(runs.unfinished().values_list("task_id", flat=True))
        return cascade.send_to_all(task_ids, CANCEL_TASK, message, using=self.db, **options)

    def pause(
        self, task_id: str, message: str = "", requested_by: Any = None, **options: Any
    ) -> CeleryTaskSignal:
        """Send ``pause_task``: the task blocks at its next checkpoint until resumed."""
        return self.send(task_id, PAUSE_TASK, message, requested_by, **options)

    def resume(
        self, task_id: str, message: str = "", requested_by: Any = None, **options: Any
    ) -> CeleryTaskSignal:
        """Send ``resume_task``: a paused task carries on from its checkpoint."""
        return self.send(task_id, RESUME_TASK, message, requested_by, **options)


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
    #: The names of every way of sending (``tasksignal.states.Source``).
    Source = Source

    task_id = models.CharField(max_length=255, db_index=True)
    signal = models.CharField(max_length=32, choices=registry.signal_choices)
    message = models.TextField(blank=True, help_text="Optional text for the task to read.")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    source = models.CharField(
        max_length=8,
        choices=Source.CHOICES,
        default=Source.CODE,
        db_default=Source.CODE,
        editable=False,
        help_text="How it was sent: admin, API, command line or code.",
    )
    cascade = models.BooleanField(
        default=False,
        db_default=False,
        editable=False,
        help_text="Also meant for every task this one started, and starts later.",
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

    #: Set by ``send``: whether the row was pending already (nothing new was written).
    already_pending: bool = False
    #: Set by ``send(cascade=True)``: how many tasks the signal reached (this one
    #: included) and how many of them had not finished when it was sent.
    reached: int = 1
    still_to_stop: int = 0

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
            # The admin's "cancel outcome" filter over many runs.
            models.Index(
                fields=["outcome", "task_id"],
                condition=Q(signal=CANCEL_TASK),
                name="tasksignal_cancel_outcome",
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


class TaskRunQuerySet(models.QuerySet["TaskRun"]):
    """Queries over runs, named for what they mean."""

    def unfinished(self) -> TaskRunQuerySet:
        """Runs that may still do something: queued, running or paused."""
        return self.exclude(state__in=RunState.FINISHED)

    def with_signal_facts(self) -> TaskRunQuerySet:
        """Annotate each run with what its signals say, in the same query (no query per row).

        ``cancel_outcome`` and ``cancel_latency`` (a ``timedelta``, on the database clock)
        of its latest cancel, ``None`` while there is none or it is pending; and
        ``pending_signals``, the kinds of its pending signals. Each is a subquery served
        by the signal table's ``task_id`` index.
        """
        cancels = CeleryTaskSignal.objects.filter(
            task_id=OuterRef("task_id"), signal=CANCEL_TASK
        ).order_by("-created", "-id")
        latency = ExpressionWrapper(F("completed_at") - F("created"), output_field=DurationField())
        pending = CeleryTaskSignal.objects.filter(task_id=OuterRef("task_id"), completed=False)
        return self.annotate(
            cancel_outcome=Subquery(cancels.values("outcome")[:1]),
            cancel_latency=Subquery(cancels.annotate(latency=latency).values("latency")[:1]),
            pending_signals=ArraySubquery(pending.order_by("id").values("signal")),
        )


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
    kwargs = models.JSONField(
        null=True,
        blank=True,
        editable=False,
        help_text="The keyword arguments, for runs started from the admin or the API.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = TaskRunQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            # The admin's list: newest first, and its worker and age filters.
            models.Index(
                F("started_at").desc(nulls_first=True), F("id").desc(), name="tasksignal_run_newest"
            ),
            models.Index(fields=["worker"], name="tasksignal_run_worker"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.task_id} ({self.state})"

    @property
    def progress(self) -> float | None:
        """Fraction done, 0..1, when the task reported a total."""
        if self.progress_current is None or not self.progress_total:
            return None
        return min(1.0, self.progress_current / self.progress_total)

    @property
    def shown_state(self) -> str:
        """The state to show a person: ``cancelled`` as soon as a cancel stopped the run.

        The worker writes the record of a run's end in its next batch; a cancel's outcome
        is written first, so a run whose cancel stopped it is cancelled even while its
        record still says running. Needs :meth:`TaskRunQuerySet.with_signal_facts`
        (without it, this is the record's state).
        """
        outcome = getattr(self, "cancel_outcome", None)
        if outcome in Outcome.STOPPED and self.state not in RunState.FINISHED:
            return RunState.CANCELLED
        return self.state

    def allowed_signals(self) -> frozenset[str]:
        """The built-in signals this run's state lets a person send now.

        Cancel while it may still run; pause while queued or running; resume while paused
        (or a pause is pending); none of a kind already pending. Needs
        :meth:`TaskRunQuerySet.with_signal_facts` for the pending ones.
        """
        state = self.shown_state
        allowed = set()
        if state not in RunState.FINISHED:
            allowed.add(CANCEL_TASK)
        if state in (RunState.QUEUED, RunState.RUNNING):
            allowed.add(PAUSE_TASK)
        pending = set(getattr(self, "pending_signals", None) or ())
        if state == RunState.PAUSED or PAUSE_TASK in pending:
            allowed.add(RESUME_TASK)
        return frozenset(allowed - pending)


class TaskLineage(models.Model):
    """The tasks, groups and chords a published task descends from (``lineage.py``).

    Written by the producer as it publishes a task started inside a running task, a
    member of a group or chord, or a link of a chain (the links not sent yet included),
    so that a cascade finds every descendant with one indexed query: ``ancestors``
    contains the id cancelled (``@>``, served by the GIN index).
    """

    task_id = models.CharField(max_length=255, unique=True)
    ancestors = ArrayField(models.TextField())
    created = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        indexes = [GinIndex(fields=["ancestors"], name="tasksignal_lineage_ancestors")]

    def __str__(self) -> str:
        return f"{self.task_id} < {' < '.join(reversed(self.ancestors))}"


class TaskSubject(models.Model):
    """What a task works on: a model instance, recorded by ``task.delay_for(obj, ...)``
    (``subjects.py``), so that ``CeleryTaskSignal.objects.cancel_for(obj)`` finds it."""

    task_id = models.CharField(max_length=255)
    content_type = models.ForeignKey(ContentType, on_delete=models.CASCADE)
    object_id = models.CharField(max_length=255)
    subject = GenericForeignKey("content_type", "object_id")
    created = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        indexes = [
            models.Index(fields=["content_type", "object_id"], name="tasksignal_subject_object")
        ]

    def __str__(self) -> str:
        return f"{self.task_id} on {self.content_type.model} {self.object_id}"


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
