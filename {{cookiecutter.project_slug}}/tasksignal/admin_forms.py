"""Forms of the admin: sending a signal by hand, and starting a task."""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any, NoReturn

from celery import current_app
from django import forms
from django.core.exceptions import ValidationError

from tasksignal import conf
from tasksignal.models import CeleryTaskSignal, TaskRun

if TYPE_CHECKING:  # django-stubs makes ModelForm generic; Django's class takes no parameters
    _ModelForm = forms.ModelForm[CeleryTaskSignal]
else:
    _ModelForm = forms.ModelForm


def known_task(task_id: str) -> bool:
    """Whether anything records ``task_id``: a run record or an earlier signal (the API's
    rule; the command line asks for a run record)."""
    return (
        TaskRun.objects.filter(task_id=task_id).exists()
        or CeleryTaskSignal.objects.filter(task_id=task_id).exists()
    )


class SignalAddForm(_ModelForm):
    """A signal typed in by hand: refused for a task id nothing records, unless the
    sender says it knows better (a task still queued), as ``--force`` does on the
    command line. A signal of a kind already pending for the task is answered with the
    pending one (``CeleryTaskSignalAdmin.response_add`` says so)."""

    send_anyway = forms.BooleanField(
        required=False,
        label="Send anyway",
        help_text="Send even though no run of this task id is recorded (a task still queued "
        "that no worker has taken yet).",
    )

    class Meta:
        model = CeleryTaskSignal
        fields = ["task_id", "signal", "message"]

    def clean(self) -> dict[str, Any] | None:
        """Refuse an unknown task id unless "Send anyway" is ticked."""
        cleaned = super().clean()
        task_id = cleaned.get("task_id")
        if task_id and not cleaned.get("send_anyway") and not known_task(task_id):
            self.add_error(
                "task_id",
                ValidationError(
                    "No run of task %(task_id)s is recorded and it was never signalled: check "
                    'the id, or tick "Send anyway" to signal a task that is still queued.',
                    code="unknown_task",
                    params={"task_id": task_id},
                ),
            )
        return cleaned


class StartTaskForm(forms.Form):
    """Start one of ``TASKSIGNAL_STARTABLE_TASKS`` with keyword arguments given as JSON."""

    task = forms.ChoiceField(label="Task", help_text="The tasks TASKSIGNAL_STARTABLE_TASKS lists.")
    kwargs = forms.CharField(
        label="Keyword arguments",
        initial="{}",
        widget=forms.Textarea(attrs={"rows": 6, "cols": 60, "spellcheck": "false"}),
        help_text='A JSON object, e.g. {"steps": 50, "step_seconds": 0.2}.',
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = conf.get("TASKSIGNAL_STARTABLE_TASKS")
        self.fields["task"].choices = [(name, name) for name in names]

    def clean_kwargs(self) -> dict[str, Any]:
        """A JSON object; checked against the task's signature when this process knows it."""
        text = self.cleaned_data["kwargs"].strip() or "{}"
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise ValidationError(
                "Not valid JSON: %(error)s", code="json", params={"error": exc}
            ) from None
        if not isinstance(value, dict):
            raise ValidationError("Must be a JSON object (keyword arguments by name).", code="type")
        return value

    def clean(self) -> dict[str, Any] | None:
        """Refuse keyword arguments the task does not take, before it is queued."""
        cleaned = super().clean()
        name, kwargs = cleaned.get("task"), cleaned.get("kwargs")
        if name and kwargs is not None:
            problem = signature_problem(name, kwargs)
            if problem:
                self.add_error("kwargs", ValidationError(problem, code="signature"))
        return cleaned


def signature_problem(name: str, kwargs: dict[str, Any]) -> str | None:
    """Why task ``name`` cannot be called with ``kwargs``, or ``None`` when it can (or when
    this process does not have the task: the worker will say)."""
    task = current_app.tasks.get(name)
    if task is None:
        return None
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        return f"{name} does not take these arguments: {exc}."
    return None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")
