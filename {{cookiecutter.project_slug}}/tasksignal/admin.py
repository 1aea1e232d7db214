"""Admin for task runs and signals: watch what runs, and cancel, pause or resume it.

The task-run list shows each run's state with its cancel outcome, progress, timing,
cancel latency, worker and pid, and a Cancel, Pause and Resume button per row; it updates
itself while runs are live (``static/tasksignal/admin/live.js`` polls :meth:`live_view`, a
small JSON view: one query for the rows on the page). A run's page is read-only and tells
its story: every signal it was sent, by whom and how, when it was acknowledged and
completed, with which outcome and latency. Tasks listed in ``TASKSIGNAL_STARTABLE_TASKS``
can be started from the list.

Permissions are the API's: sending needs ``tasksignal.add_celerytasksignal``, starting
``tasksignal.add_taskrun``, reading ``tasksignal.view_taskrun``. Runs are never edited
(workers write them) and unfinished ones are never deleted (their worker would write a
blank row again). The logic is in helpers the tests call without a request
(:func:`send_to_runs`, :func:`signal_run`); the extra views are in ``admin_views.py``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import ngettext

from tasksignal import admin_views
from tasksignal.admin_filters import AgeFilter, CancelOutcomeFilter, TaskNameFilter, WorkerFilter
from tasksignal.admin_forms import SignalAddForm
from tasksignal.cascade import send_to_all
from tasksignal.models import ApiToken, CeleryTaskSignal, TaskRun, TaskRunQuerySet
from tasksignal.registry import CANCEL_TASK, PAUSE_TASK, RESUME_TASK
from tasksignal.states import Outcome, RunState, Source

if TYPE_CHECKING:  # django-stubs makes ModelAdmin generic; Django's class takes no parameters
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

SEND_PERMISSION = "tasksignal.add_celerytasksignal"
START_PERMISSION = "tasksignal.add_taskrun"
#: The row buttons: what each sends, in the order they are shown.
VERBS = {"cancel": CANCEL_TASK, "pause": PAUSE_TASK, "resume": RESUME_TASK}
EMPTY = "—"
STATE_LABELS = dict(RunState.CHOICES)
OUTCOME_LABELS = dict(Outcome.CHOICES)


# -- helpers the views and the tests share ---------------------------------------------------
def send_to_runs(runs: TaskRunQuerySet, signal: str, user: Any, cascade: bool = False) -> int:
    """Send ``signal`` to every unfinished run in ``runs``, as ``user`` from the admin;
    return how many runs now have one pending (a signal already pending counts). With
    ``cascade``, to every task they started too, and return how many tasks it reached."""
    task_ids = list(runs.unfinished().values_list("task_id", flat=True))
    if cascade:
        reach = send_to_all(task_ids, signal, requested_by=user, source=Source.ADMIN)
        return reach.reached
    rows = CeleryTaskSignal.objects.send_many(
        task_ids, signal, requested_by=user, source=Source.ADMIN
    )
    return len(rows)


def signal_run(run: TaskRun, signal: str, user: Any) -> tuple[int, str]:
    """Send ``signal`` to ``run`` for ``user`` if its state allows it (see
    :meth:`TaskRun.allowed_signals`); return a message level and what happened.

    ``run`` needs :meth:`~tasksignal.models.TaskRunQuerySet.with_signal_facts`.
    """
    verb = _verb(signal)
    if signal not in run.allowed_signals():
        if signal in (run.pending_signals or ()):
            return messages.WARNING, f"A {verb} of {run.task_id} was already pending."
        state = STATE_LABELS.get(run.shown_state, run.shown_state).lower()
        return messages.ERROR, f"{run.task_id} is {state}: it cannot be sent a {verb} now."
    row = CeleryTaskSignal.objects.send(run.task_id, signal, requested_by=user, source=Source.ADMIN)
    if row.already_pending:
        return messages.WARNING, f"A {verb} of {run.task_id} was already pending."
    return messages.SUCCESS, f"Sent a {verb} to {run.task_name} {run.task_id}."


def _verb(signal: str) -> str:
    return {kind: verb for verb, kind in VERBS.items()}.get(signal, signal)


# -- formatting ---------------------------------------------------------------------------------
def format_time(value: datetime | None) -> str:
    """A timestamp to the second in the site's time zone; the exact one in ``datetime``."""
    if value is None:
        return EMPTY
    local = timezone.localtime(value)
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        value.isoformat(),
        local.isoformat(timespec="milliseconds"),
        local.strftime("%Y-%m-%d %H:%M:%S"),
    )


def format_duration(value: timedelta | None) -> str:
    """A duration a person reads at a glance: ``0.42 s``, ``12.3 s``, ``4 min 05 s``.

    >>> format_duration(timedelta(seconds=0.4213)), format_duration(timedelta(seconds=245))
    ('0.42 s', '4 min 05 s')
    >>> format_duration(timedelta(hours=2, minutes=3))
    '2 h 03 min'
    """
    if value is None:
        return EMPTY
    seconds = max(0.0, value.total_seconds())
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_latency(value: timedelta | None) -> str:
    """A signal's latency: milliseconds below a second, else seconds.

    >>> format_latency(timedelta(milliseconds=12.34)), format_latency(timedelta(seconds=2.5))
    ('12.3 ms', '2.50 s')
    """
    if value is None:
        return EMPTY
    ms = value.total_seconds() * 1000
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


class SignalSendingAdmin(_ModelAdmin):
    """Grants the ``signal`` action permission to users who may add signal rows."""

    def has_signal_permission(self, request: HttpRequest) -> bool:
        """Whether the user may send signals (``tasksignal.add_celerytasksignal``)."""
        return request.user.has_perm(SEND_PERMISSION)


def _signal_action(signal: str, verb: str) -> Any:
    @admin.action(description=f"{verb.capitalize()} selected runs", permissions=["signal"])
    def action(modeladmin: Any, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        modeladmin.report_sent(request, send_to_runs(queryset, signal, request.user), verb)

    action.__name__ = f"{verb}_selected"
    return action


@admin.register(TaskRun)
class TaskRunAdmin(SignalSendingAdmin):
    """The operator's list of runs, their pages, and the buttons that signal them."""

    list_display = [
        "task_display",
        "task_id",
        "state_display",
        "progress_display",
        "started",
        "finished",
        "duration",
        "latency",
        "worker_display",
        "pid_display",
    ]
    list_display_links = ["task_id"]
    list_filter = ["state", CancelOutcomeFilter, TaskNameFilter, WorkerFilter, AgeFilter]
    search_fields = ["=task_id", "task_name"]
    search_help_text = "An exact task id, or part of a task name."
    list_per_page = 50
    # The full count is one more COUNT(*) over the whole table on every page view.
    show_full_result_count = False
    actions = [
        "cancel_selected",
        _signal_action(PAUSE_TASK, "pause"),
        _signal_action(RESUME_TASK, "resume"),
        "delete_finished",
    ]
    fieldsets = [
        (None, {"fields": ["task_name", "task_id", "state_display", "row_actions"]}),
        (
            "Progress and timing",
            {"fields": ["progress_display", "started", "finished", "duration", "latency"]},
        ),
        ("Where", {"fields": ["worker_display", "pid_display"]}),
        ("Call", {"fields": ["kwargs_display", "result_display", "error"]}),
    ]
    readonly_fields = [
        "state_display",
        "row_actions",
        "progress_display",
        "started",
        "finished",
        "duration",
        "latency",
        "worker_display",
        "pid_display",
        "kwargs_display",
        "result_display",
    ]
    #: The cells the live view sends again while a run is live (their ``field-`` names).
    LIVE_CELLS = (
        "state_display",
        "progress_display",
        "started",
        "finished",
        "duration",
        "latency",
        "worker_display",
        "pid_display",
    )

    # -- permissions -------------------------------------------------------------------
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs are recorded by workers, never typed in ("Start a task" starts one)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # read-only: a run's page has no Save buttons

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # An unfinished run's worker would write a blank row again.
        if obj is not None and obj.state not in RunState.FINISHED:
            return False
        return super().has_delete_permission(request, obj)

    def has_start_permission(self, request: HttpRequest) -> bool:
        """Whether the user may start tasks (``tasksignal.add_taskrun``), as in the API."""
        return request.user.has_perm(START_PERMISSION)

    def get_actions(self, request: HttpRequest, action_location: Any = None) -> Any:
        # Django 6.1 passes where the actions show (action_location) and deprecates overrides
        # that do not take it; Django 5.2 passes nothing.
        if action_location is None:
            actions = super().get_actions(request)
        else:
            # (5.2's stubs know no such argument; 6.1's do.)
            actions = super().get_actions(  # type: ignore[call-arg, unused-ignore]
                request, action_location=action_location
            )
        actions.pop("delete_selected", None)  # it would delete running runs too
        return actions

    # -- lists -------------------------------------------------------------------------
    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).with_signal_facts()

    def get_list_display(self, request: HttpRequest) -> Any:
        if not self.has_signal_permission(request):
            return self.list_display
        # The buttons beside the state they act on, where a narrow screen still shows them.
        at = self.list_display.index("state_display") + 1
        return [*self.list_display[:at], "row_actions", *self.list_display[at:]]

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        wrap = self.admin_site.admin_view
        prefix = "{}_{}".format(*info)
        return [
            path("live/", wrap(admin_views.live_view(self)), name=f"{prefix}_live"),
            path("start/", wrap(admin_views.start_view(self)), name=f"{prefix}_start"),
            path(
                "cancel-matching/",
                wrap(admin_views.cancel_matching_view(self)),
                name=f"{prefix}_cancel_matching",
            ),
            path(
                "<path:object_id>/signal/<str:verb>/",
                wrap(admin_views.signal_view(self)),
                name=f"{prefix}_signal",
            ),
            *super().get_urls(),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = admin_views.live_context(self, request)
        newest = TaskRun.objects.order_by("-pk").values_list("pk", flat=True).first()
        context["newest_run"] = newest or 0
        if self.has_start_permission(request) and admin_views.startable_tasks():
            context["start_url"] = reverse("admin:tasksignal_taskrun_start")
        if self.has_signal_permission(request):
            query = request.GET.urlencode()
            url = reverse("admin:tasksignal_taskrun_cancel_matching")
            context["cancel_matching_url"] = f"{url}?{query}" if query else url
        return super().changelist_view(request, {**context, **(extra_context or {})})

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        run = self.get_object(request, object_id)
        context = admin_views.live_context(self, request)
        if run is not None:
            context.update(
                title=f"Task run {run.task_id}",
                subtitle=run.task_name,
                run=run,
                timeline=self.timeline(run),
                signals_url=(
                    f"{reverse('admin:tasksignal_celerytasksignal_changelist')}"
                    f"?task_id={run.task_id}"
                ),
            )
        context.update(extra_context or {})
        return super().change_view(request, object_id, form_url, context)

    def report_sent(
        self, request: HttpRequest, count: int, verb: str, cascade: bool = False
    ) -> None:
        """Tell the user how many runs (with ``cascade``: tasks) a bulk send reached."""
        if cascade:
            text = ngettext(
                "Sent %(verb)s to %(count)d task: the unfinished runs and all they started.",
                "Sent %(verb)s to %(count)d tasks: the unfinished runs and all they started.",
                count,
            )
        else:
            text = ngettext(
                "Sent %(verb)s to %(count)d unfinished run.",
                "Sent %(verb)s to %(count)d unfinished runs.",
                count,
            )
        self.message_user(
            request,
            text % {"verb": verb, "count": count},
            messages.SUCCESS if count else messages.WARNING,
        )

    # -- actions -----------------------------------------------------------------------
    @admin.action(description="Cancel selected runs…", permissions=["signal"])
    def cancel_selected(
        self, request: HttpRequest, queryset: TaskRunQuerySet
    ) -> HttpResponseBase | None:
        """Ask for confirmation, showing how many unfinished runs would be cancelled, with
        the option to cancel everything they started too (``cascade``)."""
        if request.POST.get("post") == "yes":
            cascade = request.POST.get("cascade") == "on"
            count = send_to_runs(queryset, CANCEL_TASK, request.user, cascade)
            self.report_sent(request, count, "cancel", cascade)
            return None
        return admin_views.cancel_confirmation(self, request, queryset, selected=True)

    @admin.action(description="Delete selected finished runs", permissions=["delete"])
    def delete_finished(self, request: HttpRequest, queryset: TaskRunQuerySet) -> None:
        """Delete the finished runs among those selected; keep the others, and say so."""
        finished = queryset.filter(state__in=RunState.FINISHED)
        deleted = finished.count()
        kept = queryset.count() - deleted
        finished.delete()
        message = ngettext(
            "Deleted %(count)d finished run.", "Deleted %(count)d finished runs.", deleted
        ) % {"count": deleted}
        if kept:
            message += " " + ngettext(
                "Kept %(count)d unfinished run.", "Kept %(count)d unfinished runs.", kept
            ) % {"count": kept}
        self.message_user(request, message, messages.SUCCESS if deleted else messages.WARNING)

    # -- cells (the list's columns and the run page's fields) ------------------------------
    @admin.display(description="Task", ordering="task_name")
    def task_display(self, run: TaskRun) -> str:
        """The task's name, which may wrap after each dot of its dotted path."""
        return format_html_join(
            mark_safe(".<wbr>"), "{}", ((part,) for part in run.task_name.split("."))
        )

    @admin.display(description="State", ordering="state")
    def state_display(self, run: TaskRun) -> str:
        """The state, the cancel's outcome once there is one, and what is pending."""
        state = run.shown_state
        parts = [
            format_html(
                '<span class="ts-state ts-state-{}">{}</span>',
                state,
                STATE_LABELS.get(state, state),
            )
        ]
        outcome = getattr(run, "cancel_outcome", None)
        if outcome:
            parts.append(
                format_html(
                    '<span class="ts-outcome ts-outcome-{}" title="{}">{}</span>',
                    outcome,
                    OUTCOME_LABELS.get(outcome, outcome),
                    outcome.replace("_", " "),
                )
            )
        for kind in getattr(run, "pending_signals", None) or ():
            parts.append(format_html('<span class="ts-pending">{} pending</span>', _verb(kind)))
        return format_html_join(" ", "{}", ((part,) for part in parts))

    @admin.display(description="Progress")
    def progress_display(self, run: TaskRun) -> str:
        """A progress bar with its percentage and the task's message."""
        fraction = run.progress
        if fraction is None and not run.progress_message:
            return EMPTY
        parts = []
        if fraction is not None:
            parts.append(
                format_html(
                    '<progress class="ts-progress" max="100" value="{}" aria-label="{}">'
                    "{}%</progress> <span>{}%</span>",
                    round(fraction * 100),
                    f"Progress of {run.task_id}",
                    round(fraction * 100),
                    round(fraction * 100),
                )
            )
        if run.progress_message:
            parts.append(format_html('<span class="ts-message">{}</span>', run.progress_message))
        return format_html_join(" ", "{}", ((part,) for part in parts))

    @admin.display(description="Started", ordering="started_at")
    def started(self, run: TaskRun) -> str:
        return format_time(run.started_at)

    @admin.display(description="Finished", ordering="finished_at")
    def finished(self, run: TaskRun) -> str:
        return format_time(run.finished_at)

    @admin.display(description="Duration")
    def duration(self, run: TaskRun) -> str:
        """How long it ran (so far, for a live run)."""
        if run.started_at is None:
            return EMPTY
        if run.finished_at is not None:
            return format_duration(run.finished_at - run.started_at)
        if run.shown_state in RunState.LIVE:
            return format_html(
                '{} <span class="ts-note">so far</span>',
                format_duration(timezone.now() - run.started_at),
            )
        return EMPTY

    @admin.display(description="Cancel latency")
    def latency(self, run: TaskRun) -> str:
        """From the cancel being sent to the task having stopped (database clock)."""
        return format_latency(getattr(run, "cancel_latency", None))

    @admin.display(description="Worker", ordering="worker")
    def worker_display(self, run: TaskRun) -> str:
        return run.worker or EMPTY

    @admin.display(description="PID")
    def pid_display(self, run: TaskRun) -> str:
        return EMPTY if run.pid is None else str(run.pid)

    @admin.display(description="Signals")
    def row_actions(self, run: TaskRun) -> SafeString:
        """Cancel, Pause and Resume buttons, each disabled where the run's state forbids it.

        They submit the page's one signal form (``form=`` attribute: the list's own form
        cannot hold another), which carries the CSRF token; ``live.js`` sends them without
        a reload, and without JavaScript they post and come back.
        """
        allowed = run.allowed_signals()
        return format_html(
            '<span class="ts-actions" role="group" aria-label="{}">{}</span>',
            f"Signals for {run.task_id}",
            format_html_join(
                "",
                '<button type="submit" form="tasksignal-signal-form" class="ts-button '
                'ts-button-{}" formaction="{}" aria-label="{}"{}>{}</button>',
                (
                    (
                        verb,
                        reverse("admin:tasksignal_taskrun_signal", args=[run.pk, verb]),
                        f"{verb.capitalize()} {run.task_id}",
                        mark_safe("") if kind in allowed else mark_safe(" disabled"),
                        verb.capitalize(),
                    )
                    for verb, kind in VERBS.items()
                ),
            ),
        )

    @admin.display(description="Keyword arguments")
    def kwargs_display(self, run: TaskRun) -> str:
        if run.kwargs is None:
            return "Not recorded: only runs started from the admin or the API keep them."
        return format_html("<pre>{}</pre>", json.dumps(run.kwargs, indent=2, sort_keys=True))

    @admin.display(description="Result")
    def result_display(self, run: TaskRun) -> str:
        """The return value (from Celery's result backend), or how the run ended."""
        return admin_views.result_html(run)

    def timeline(self, run: TaskRun) -> list[dict[str, Any]]:
        """The run's story, oldest first: queued, started, each signal sent, acknowledged
        and completed (with its outcome and latency), finished."""
        return admin_views.timeline(run)


@admin.register(CeleryTaskSignal)
class CeleryTaskSignalAdmin(SignalSendingAdmin):
    """Signals: sent from the add form (checked like the command line), then read-only."""

    list_display = [
        "id",
        "signal",
        "task_link",
        "source",
        "requested_by",
        "completed",
        "outcome",
        "sent",
        "completed_time",
        "latency",
        "error",
    ]
    list_display_links = ["id", "signal"]
    list_filter = ["signal", "source", "completed", "outcome"]
    list_select_related = ["requested_by"]
    search_fields = ["=task_id", "message"]
    search_help_text = "An exact task id, or part of a message."
    date_hierarchy = "created"
    form = SignalAddForm
    add_fields = ["task_id", "signal", "message", "send_anyway"]
    fields = [
        "task_id",
        "task_link",
        "signal",
        "message",
        "source",
        "requested_by",
        "completed",
        "outcome",
        "error",
        "sent",
        "acknowledged",
        "completed_time",
        "latency",
    ]
    readonly_fields = ["task_link", "sent", "acknowledged", "completed_time", "latency"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        run = TaskRun.objects.filter(task_id=OuterRef("task_id")).values("pk")[:1]
        return super().get_queryset(request).annotate(run_pk=Subquery(run))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # The add form: only what a person types (the rest the database fills in).
        return self.add_fields if obj is None else self.fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a sent signal is immutable: its page is read-only

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        row = CeleryTaskSignal.objects.send(
            obj.task_id, obj.signal, obj.message, requested_by=request.user, source=Source.ADMIN
        )
        obj.pk, obj.already_pending, obj.created = row.pk, row.already_pending, row.created

    def response_add(
        self, request: HttpRequest, obj: Any, post_url_continue: str | None = None
    ) -> HttpResponse:
        """Say what happened (a duplicate answers with the signal that was pending), then
        go to the task's run, or to the signal when no run is recorded."""
        if obj.already_pending:
            self.message_user(
                request,
                f"A {obj.signal} signal for {obj.task_id} was already pending (sent "
                f"{timezone.localtime(obj.created):%Y-%m-%d %H:%M:%S}): nothing new was sent, "
                "and this message was not recorded.",
                messages.WARNING,
            )
        else:
            self.message_user(request, f"Sent {obj.signal} to {obj.task_id}.", messages.SUCCESS)
        run = TaskRun.objects.filter(task_id=obj.task_id).values_list("pk", flat=True).first()
        if run is not None:
            return admin_views.redirect(reverse("admin:tasksignal_taskrun_change", args=[run]))
        return admin_views.redirect(
            reverse("admin:tasksignal_celerytasksignal_change", args=[obj.pk])
        )

    @admin.display(description="Task", ordering="task_id")
    def task_link(self, signal: CeleryTaskSignal) -> str:
        """The task id, linked to its run's page when a run is recorded."""
        run_pk = getattr(signal, "run_pk", None)
        if run_pk is None:
            return signal.task_id
        url = reverse("admin:tasksignal_taskrun_change", args=[run_pk])
        return format_html('<a href="{}">{}</a>', url, signal.task_id)

    @admin.display(description="Sent", ordering="created")
    def sent(self, signal: CeleryTaskSignal) -> str:
        return format_time(signal.created)

    @admin.display(description="Acknowledged", ordering="acknowledged_at")
    def acknowledged(self, signal: CeleryTaskSignal) -> str:
        return format_time(signal.acknowledged_at)

    @admin.display(description="Completed at", ordering="completed_at")
    def completed_time(self, signal: CeleryTaskSignal) -> str:
        return format_time(signal.completed_at)

    @admin.display(description="Latency")
    def latency(self, signal: CeleryTaskSignal) -> str:
        if signal.completed_at is None:
            return EMPTY
        return format_latency(signal.completed_at - signal.created)


@admin.register(ApiToken)
class ApiTokenAdmin(_ModelAdmin):
    """Tokens are listed and deleted (revoked) here; ``create_api_token`` makes them, since
    only it can show the secret once."""

    list_display = ["name", "user", "prefix", "created"]
    list_select_related = ["user"]
    search_fields = ["name", "user__username"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [field.name for field in ApiToken._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
