"""``manage.py tasksignal``: list runs and signals, send cancel/pause/resume, sweep."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasksignal.cascade import Reach, send_to_all
from tasksignal.filters import parse_age, runs_matching
from tasksignal.models import CeleryTaskSignal, TaskRun
from tasksignal.states import Source
from tasksignal.sweep import sweep

VERBS = {
    "cancel": CeleryTaskSignal.CANCEL_TASK,
    "pause": CeleryTaskSignal.PAUSE_TASK,
    "resume": CeleryTaskSignal.RESUME_TASK,
}

#: The options that pick runs instead of ids.
PICKS = ("task", "state", "worker", "older_than")


def _reach_line(signal: str, reach: Reach | CeleryTaskSignal) -> str:
    return f"{signal} reached {reach.reached} task(s), {reach.still_to_stop} still to stop"


class Command(BaseCommand):
    help = "List task runs and pending signals, or cancel, pause or resume running tasks."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="Show unfinished runs and pending signals.")
        listing.add_argument("--all", action="store_true", help="Include finished runs.")
        for verb in VERBS:
            send = sub.add_parser(verb, help=f"Send {VERBS[verb]} to tasks.")
            send.add_argument("task_ids", nargs="*", metavar="task_id")
            send.add_argument("--message", default="", help="Text for the task to read.")
            send.add_argument(
                "--force",
                action="store_true",
                help="Send even to ids no worker has recorded yet (tasks still queued).",
            )
            send.add_argument(
                "--cascade",
                action="store_true",
                help="Also to every task they started (chains, groups, chords, children).",
            )
            picks = send.add_argument_group("instead of ids, every unfinished run that matches")
            picks.add_argument("--task", metavar="NAME", help="Runs of this task name.")
            picks.add_argument("--state", help="Runs in this state: queued, running, paused.")
            picks.add_argument("--worker", help="Runs on this worker node.")
            picks.add_argument(
                "--older-than", metavar="AGE", help="Runs started longer ago: 90, 90s, 10m, 2h, 1d."
            )
            send.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        sub.add_parser("sweep", help="Expire, settle and purge old signals and runs now.")

    def handle(self, *args: str, action: str, **options: Any) -> None:
        if action == "list":
            self._list(options["all"])
        elif action == "sweep":
            for step, count in sweep().items():
                self.stdout.write(f"{step}: {count}")
        elif any(options[pick] is not None for pick in PICKS):
            if options["task_ids"]:
                raise CommandError(
                    "give task ids or --task/--state/--worker/--older-than, not both"
                )
            self._send_to_matching(VERBS[action], options)
        elif not options["task_ids"]:
            raise CommandError(
                "give task ids, or pick runs with --task/--state/--worker/--older-than"
            )
        elif options["cascade"]:
            self._send_cascade(VERBS[action], options["task_ids"], options["message"])
        else:
            self._send(VERBS[action], options["task_ids"], options["message"], options["force"])

    def _send_to_matching(self, signal: str, options: dict[str, Any]) -> None:
        try:
            age = None if options["older_than"] is None else parse_age(options["older_than"])
            runs = runs_matching(options["task"], options["state"], options["worker"], age)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        task_ids = list(runs.values_list("task_id", flat=True))
        if not task_ids:
            self.stdout.write("no unfinished run matches")
            return
        extra = " and every task they started" if options["cascade"] else ""
        self.stdout.write(f"{len(task_ids)} unfinished run(s) match: {signal} them{extra}?")
        if not options["yes"] and input("Type 'yes' to go on: ").strip().lower() != "yes":
            raise CommandError("nothing sent")
        reach = send_to_all(
            task_ids, signal, options["message"], cascade=options["cascade"], source=Source.CLI
        )
        self.stdout.write(self.style.SUCCESS(_reach_line(signal, reach)))

    def _send_cascade(self, signal: str, task_ids: list[str], message: str) -> None:
        for task_id in task_ids:
            row = CeleryTaskSignal.objects.send(
                task_id, signal, message, source=Source.CLI, cascade=True
            )
            self.stdout.write(self.style.SUCCESS(f"sent: {row}; {_reach_line(signal, row)}"))

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
