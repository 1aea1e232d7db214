"""``manage.py tasksignal``: list runs and signals, send cancel/pause/resume, sweep."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Source
from tasksignal.sweep import sweep

VERBS = {
    "cancel": CeleryTaskSignal.CANCEL_TASK,
    "pause": CeleryTaskSignal.PAUSE_TASK,
    "resume": CeleryTaskSignal.RESUME_TASK,
}


class Command(BaseCommand):
    help = "List task runs and pending signals, or cancel, pause or resume running tasks."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="Show unfinished runs and pending signals.")
        listing.add_argument("--all", action="store_true", help="Include finished runs.")
        for verb in VERBS:
            send = sub.add_parser(verb, help=f"Send {VERBS[verb]} to tasks.")
            send.add_argument("task_ids", nargs="+", metavar="task_id")
            send.add_argument("--message", default="", help="Text for the task to read.")
            send.add_argument(
                "--force",
                action="store_true",
                help="Send even to ids no worker has recorded yet (tasks still queued).",
            )
        sub.add_parser("sweep", help="Expire, settle and purge old signals and runs now.")

    def handle(self, *args: str, action: str, **options: Any) -> None:
        if action == "list":
            self._list(options["all"])
        elif action == "sweep":
            for step, count in sweep().items():
                self.stdout.write(f"{step}: {count}")
        else:
            self._send(VERBS[action], options["task_ids"], options["message"], options["force"])

    def _list(self, include_finished: bool) -> None:
        runs = TaskRun.objects.all()
        if not include_finished:
            runs = runs.exclude(state__in=TaskRun.FINISHED_STATES)
        for run in runs:
            progress = "" if run.progress is None else f" {run.progress:.0%}"
            self.stdout.write(
                f"{run.task_id}  {run.task_name}  {run.state}{progress}  {run.worker}"
            )
        if not runs:
            self.stdout.write("no runs")
        for signal in CeleryTaskSignal.objects.pending().order_by("created"):
            self.stdout.write(f"pending: {signal}")

    def _send(self, signal: str, task_ids: list[str], message: str, force: bool) -> None:
        known = set(TaskRun.objects.filter(task_id__in=task_ids).values_list("task_id", flat=True))
        unknown = [task_id for task_id in task_ids if task_id not in known]
        if unknown and not force:
            raise CommandError(
                f"unknown task id(s): {', '.join(unknown)}. No worker has recorded a run with "
                "that id; check the id, or pass --force to signal a task that is still queued."
            )
        rows = CeleryTaskSignal.objects.send_many(task_ids, signal, message, source=Source.CLI)
        for row in rows:
            if row.already_pending:
                self.stdout.write(self.style.WARNING(f"already pending: {row}"))
            else:
                self.stdout.write(self.style.SUCCESS(f"sent: {row}"))
