"""The task-run admin's own views: live rows, a row's signal buttons, starting a task,
cancelling a filtered list, and the pieces of a run's page (its timeline, its result).

:class:`~tasksignal.admin.TaskRunAdmin` mounts them (``get_urls``) behind the admin site's
login and CSRF checks. What a poll of :func:`live_view` costs is one query for the runs
on the page (their signals come in the same query, as subqueries) and one for the newest
run's id, besides the session and user lookups every admin request makes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from celery import current_app, states
from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.http import (
    Http404,
    HttpRequest,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
)
from django.http.response import HttpResponseBase
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme

from tasksignal import conf
from tasksignal.admin_forms import StartTaskForm
from tasksignal.models import CeleryTaskSignal, TaskRun, TaskRunQuerySet
from tasksignal.registry import CANCEL_TASK
from tasksignal.states import Outcome, RunState, Source

#: A view of the admin's own URLs, wrapped by ``admin_site.admin_view``.
View = Callable[..., HttpResponseBase]

#: Most runs one poll of the live view reports (a page holds at most ``list_per_page``).
MAX_LIVE_RUNS = 500
#: How many of the runs a bulk cancel would reach its confirmation page names.
CONFIRMATION_SAMPLE = 10
SOURCE_LABELS = dict(Source.CHOICES)
OUTCOME_LABELS = dict(Outcome.CHOICES)


def redirect(url: str) -> HttpResponseRedirect:
    """A redirect to one of our own admin URLs."""
    return HttpResponseRedirect(url)


def startable_tasks() -> list[str]:
    """The task names the admin (and the API) may start."""
    return list(conf.get("TASKSIGNAL_STARTABLE_TASKS"))


def live_context(model_admin: Any, request: HttpRequest) -> dict[str, Any]:
    """What every page that updates itself needs: where to poll, and the user's rights."""
    return {
        "live_url": reverse("admin:tasksignal_taskrun_live"),
        "can_signal": model_admin.has_signal_permission(request),
    }


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _changelist_url(query: str = "") -> str:
    url = reverse("admin:tasksignal_taskrun_changelist")
    return f"{url}?{query}" if query else url


# -- live rows ------------------------------------------------------------------------------
def live_cells(
    model_admin: Any, request: HttpRequest, run: TaskRun, detail: bool = False
) -> dict[str, str]:
    """The HTML of each cell of ``run`` that changes while it is live, by ``field-`` name:
    the same methods render the list and the run page, so a poll shows what a reload would."""
    names = list(model_admin.LIVE_CELLS)
    if model_admin.has_signal_permission(request):
        names.append("row_actions")
    cells = {name: str(getattr(model_admin, name)(run)) for name in names}
    if detail:
        cells["timeline"] = render_to_string(
            "admin/tasksignal/taskrun/timeline.html", {"timeline": timeline(run)}
        )
        cells["result_display"] = str(result_html(run))
    return cells


def live_view(model_admin: Any) -> View:
    """``GET live/?ids=1,2,3``: the live cells of those runs, as JSON.

    Answers ``{"runs": {"<pk>": {"live": bool, "cells": {...}}}, "newest": <pk>}``, where
    ``live`` says whether the run may still change and ``newest`` is the newest run's id
    (the page offers a reload when it grows). ``detail=1`` (one run's page) adds its
    timeline and result.
    """

    def view(request: HttpRequest) -> HttpResponseBase:
        if not model_admin.has_view_permission(request):
            raise PermissionDenied
        try:
            ids = [int(part) for part in request.GET.get("ids", "").split(",") if part]
        except ValueError:
            return JsonResponse({"error": "ids must be run ids separated by commas"}, status=400)
        ids = ids[:MAX_LIVE_RUNS]
        detail = request.GET.get("detail") == "1" and len(ids) == 1
        runs = model_admin.get_queryset(request).filter(pk__in=ids) if ids else []
        answer = {
            str(run.pk): {
                # Until the worker's record says it ended too (it may lag the outcome).
                "live": run.state not in RunState.FINISHED or bool(run.pending_signals),
                "cells": live_cells(model_admin, request, run, detail),
            }
            for run in runs
        }
        newest = TaskRun.objects.order_by("-pk").values_list("pk", flat=True).first()
        return JsonResponse({"runs": answer, "newest": newest or 0})

    return view


# -- a row's buttons ------------------------------------------------------------------------
def signal_view(model_admin: Any) -> View:
    """``POST <pk>/signal/<verb>/``: send cancel, pause or resume to one run.

    Answers JSON (``{"level", "message"}``; 409 when nothing was sent) to ``live.js``, and
    otherwise redirects back (to ``next``, or the list) with the message.
    """
    from tasksignal.admin import VERBS, signal_run

    def view(request: HttpRequest, object_id: str, verb: str) -> HttpResponseBase:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        kind = VERBS.get(verb)
        if kind is None:
            raise Http404(f"no signal {verb!r}")
        if not model_admin.has_signal_permission(request):
            raise PermissionDenied
        try:
            run = model_admin.get_queryset(request).get(pk=int(object_id))
        except (ValueError, TaskRun.DoesNotExist):
            raise Http404("no such run") from None
        level, message = signal_run(run, kind, request.user)
        if _wants_json(request):
            tag = messages.DEFAULT_TAGS[level]
            status = 200 if level == messages.SUCCESS else 409
            return JsonResponse({"level": tag, "message": message}, status=status)
        model_admin.message_user(request, message, level)
        target = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(
            target, {request.get_host()}, require_https=request.is_secure()
        ):
            target = _changelist_url()
        return redirect(target)

    return view


# -- bulk cancel --------------------------------------------------------------------------------
def cancel_confirmation(
    model_admin: Any, request: HttpRequest, queryset: TaskRunQuerySet, *, selected: bool
) -> HttpResponseBase:
    """The page that asks "cancel these N runs?" before a bulk cancel.

    ``selected``: the runs ticked in the list (the form posts the action again, with
    ``post=yes``); otherwise every run matching the list's filters (the form posts to
    ``cancel-matching/`` with the same query).
    """
    unfinished = queryset.unfinished()
    count = unfinished.count()
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Cancel runs?",
        "opts": model_admin.opts,
        "count": count,
        "sample": list(unfinished.order_by("-pk")[:CONFIRMATION_SAMPLE]),
        "selected": selected,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "selected_ids": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "select_across": request.POST.get("select_across", "0"),
        "filters": sorted(request.GET.items()),
        "changelist_url": _changelist_url(request.GET.urlencode()),
    }
    return TemplateResponse(request, "admin/tasksignal/taskrun/cancel_confirmation.html", context)


def cancel_matching_view(model_admin: Any) -> View:
    """``cancel-matching/?<the list's filters>``: confirm, then cancel every unfinished run
    the list shows with those filters (all its pages)."""
    from tasksignal.admin import send_to_runs

    def view(request: HttpRequest) -> HttpResponseBase:
        if not model_admin.has_signal_permission(request):
            raise PermissionDenied
        try:
            changelist = model_admin.get_changelist_instance(request)
        except IncorrectLookupParameters:
            return redirect(_changelist_url("e=1"))
        queryset = changelist.get_queryset(request)
        if request.method == "POST":
            cascade = request.POST.get("cascade") == "on"
            count = send_to_runs(queryset, CANCEL_TASK, request.user, cascade)
            model_admin.report_sent(request, count, "cancel", cascade)
            return redirect(_changelist_url(request.GET.urlencode()))
        return cancel_confirmation(model_admin, request, queryset, selected=False)

    return view


# -- starting a task ----------------------------------------------------------------------------
def start_view(model_admin: Any) -> View:
    """``start/``: start one of ``TASKSIGNAL_STARTABLE_TASKS`` with JSON kwargs, recorded
    as the API records it (a ``queued`` run first), then show its page."""
    from tasksignal.api import REDIS_ERRORS, REDIS_UNAVAILABLE, ApiError, start_recorded

    def view(request: HttpRequest) -> HttpResponseBase:
        if not model_admin.has_start_permission(request):
            raise PermissionDenied
        form = StartTaskForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            name, kwargs = form.cleaned_data["task"], form.cleaned_data["kwargs"]
            try:
                task_id = start_recorded(name, kwargs)
            except ApiError as exc:
                form.add_error(None, exc.message)
            except REDIS_ERRORS:
                form.add_error(None, REDIS_UNAVAILABLE)
            else:
                model_admin.message_user(request, f"Started {name} as {task_id}.", messages.SUCCESS)
                run = TaskRun.objects.get(task_id=task_id)
                return redirect(reverse("admin:tasksignal_taskrun_change", args=[run.pk]))
        context = {
            **model_admin.admin_site.each_context(request),
            "title": "Start a task",
            "opts": model_admin.opts,
            "form": form,
            "tasks": startable_tasks(),
            "changelist_url": _changelist_url(),
        }
        return TemplateResponse(request, "admin/tasksignal/taskrun/start.html", context)

    return view


# -- a run's page -------------------------------------------------------------------------------
def timeline(run: TaskRun) -> list[dict[str, Any]]:
    """The events of ``run``, oldest first: its start, every signal it was sent (by whom
    and how), acknowledged and completed (outcome, latency, error), and its end.

    Each event is ``{"at": datetime | None, "what": str, "detail": str, "signal": row}``.
    One query (the signals, with their senders).
    """
    from tasksignal.admin import STATE_LABELS, format_latency

    events = []
    if run.started_at is not None:
        where = f"on {run.worker}" + (f", pid {run.pid}" if run.pid else "")
        events.append({"at": run.started_at, "what": "Started", "detail": where, "signal": None})
    signals = (
        CeleryTaskSignal.objects.filter(task_id=run.task_id)
        .select_related("requested_by")
        .order_by("created", "id")
    )
    for signal in signals:
        sender = signal.requested_by.get_username() if signal.requested_by else "no user"
        how = SOURCE_LABELS.get(signal.source, signal.source)
        detail = f"by {sender}, from {how.lower() if how != 'API' else how}"
        if signal.message:
            detail += f": “{signal.message}”"
        sent = {"at": signal.created, "what": f"{signal.signal} sent", "detail": detail}
        events.append({**sent, "signal": signal})
        if signal.acknowledged_at is not None and signal.acknowledged_at != signal.completed_at:
            events.append(
                {
                    "at": signal.acknowledged_at,
                    "what": f"{signal.signal} acknowledged",
                    "detail": "the worker holding the task has it",
                    "signal": signal,
                }
            )
        if signal.completed:
            outcome = OUTCOME_LABELS.get(signal.outcome, signal.outcome)
            detail = f"{signal.outcome} ({outcome.lower()}), latency "
            detail += format_latency(signal.completed_at - signal.created)
            if signal.error:
                detail += f"; error: {signal.error}"
            events.append(
                {
                    "at": signal.completed_at,
                    "what": f"{signal.signal} completed",
                    "detail": detail,
                    "signal": signal,
                }
            )
    if run.finished_at is not None:
        state = STATE_LABELS.get(run.state, run.state)
        events.append({"at": run.finished_at, "what": state, "detail": "", "signal": None})
    # Stable: events at the same instant keep the order above (a cancel's send before its end).
    events.sort(key=lambda event: event["at"])
    return events


def result_html(run: TaskRun) -> str:
    """What the run returned (from Celery's result backend), or why it has nothing to show."""
    from tasksignal.api import REDIS_ERRORS

    state = run.shown_state
    if state == RunState.CANCELLED:
        outcome = getattr(run, "cancel_outcome", None)
        return f"Cancelled ({outcome})." if outcome else "Cancelled."
    if state not in (RunState.SUCCEEDED, RunState.FAILED):
        return "Not finished yet."
    try:
        meta = current_app.AsyncResult(run.task_id)
        celery_state, result, traceback = meta.state, meta.result, meta.traceback
    except REDIS_ERRORS:
        return "The result backend (Redis) is unavailable."
    if celery_state == states.SUCCESS:
        return format_html("<pre>{}</pre>", json.dumps(result, indent=2, default=repr))
    if celery_state == states.FAILURE and traceback:
        return format_html("<pre>{}</pre>", traceback)
    if state == RunState.FAILED:
        return run.error or "Failed (no error recorded)."
    return "Not in the result backend (results expire after CELERY_RESULT_EXPIRES)."
