"""Admin for signals and task runs: watch what runs, and cancel, pause or resume it.

Sending needs the ``tasksignal.add_celerytasksignal`` permission, whichever page it is
sent from.
"""

from django.contrib import admin, messages
from django.utils.translation import ngettext

from tasksignal.models import ApiToken, CeleryTaskSignal, TaskRun

SEND_PERMISSION = "tasksignal.add_celerytasksignal"


def send_to_runs(runs, signal: str, user) -> int:
    """Send ``signal`` to every unfinished run in ``runs``; return how many were signalled."""
    task_ids = runs.exclude(state__in=TaskRun.FINISHED_STATES).values_list("task_id", flat=True)
    return len(CeleryTaskSignal.objects.send_many(list(task_ids), signal, requested_by=user))


class SignalSendingAdmin(admin.ModelAdmin):
    """Grants the ``signal`` action permission to users who may add signal rows."""

    def has_signal_permission(self, request) -> bool:
        return request.user.has_perm(SEND_PERMISSION)


def _signal_action(signal: str, verb: str):
    @admin.action(description=f"{verb.capitalize()} selected running tasks", permissions=["signal"])
    def action(modeladmin, request, queryset):
        count = send_to_runs(queryset, signal, request.user)
        modeladmin.message_user(
            request,
            ngettext(
                "Sent %(verb)s to %(count)d running task.",
                "Sent %(verb)s to %(count)d running tasks.",
                count,
            )
            % {"verb": verb, "count": count},
            messages.SUCCESS if count else messages.WARNING,
        )

    action.__name__ = f"{verb}_selected"
    return action


@admin.register(TaskRun)
class TaskRunAdmin(SignalSendingAdmin):
    list_display = ["task_name", "task_id", "state", "worker", "started_at", "progress_display"]
    list_filter = ["state", "task_name", "worker"]
    search_fields = ["task_id", "task_name"]
    readonly_fields = [field.name for field in TaskRun._meta.fields]
    actions = [
        _signal_action(CeleryTaskSignal.CANCEL_TASK, "cancel"),
        _signal_action(CeleryTaskSignal.PAUSE_TASK, "pause"),
        _signal_action(CeleryTaskSignal.RESUME_TASK, "resume"),
    ]

    @admin.display(description="Progress")
    def progress_display(self, run: TaskRun) -> str:
        return "" if run.progress is None else f"{run.progress:.0%}"

    def has_add_permission(self, request) -> bool:
        return False  # runs are recorded by workers, never typed in


@admin.register(CeleryTaskSignal)
class CeleryTaskSignalAdmin(SignalSendingAdmin):
    list_display = ["task_id", "signal", "completed", "outcome", "created", "completed_at"]
    list_filter = ["signal", "completed", "outcome"]
    search_fields = ["task_id", "message"]
    date_hierarchy = "created"
    lifecycle_fields = [
        "completed",
        "outcome",
        "requested_by",
        "created",
        "modified",
        "acknowledged_at",
        "completed_at",
    ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return self.lifecycle_fields
        return ["task_id", "signal", "message", *self.lifecycle_fields]

    def save_model(self, request, obj, form, change) -> None:
        if change:
            return  # a sent signal is immutable; the form is read-only
        row = CeleryTaskSignal.objects.send(
            obj.task_id, obj.signal, obj.message, requested_by=request.user
        )
        obj.pk = row.pk


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are listed and deleted (revoked) here; ``create_api_token`` makes them, since
    only it can show the secret once."""

    list_display = ["name", "user", "prefix", "created"]
    search_fields = ["name", "user__username"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in ApiToken._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False
