"""Demo tasks, one per shape of work the escalation ladder must stop.

=====================  ==========================================  =====================
task                   what it does                                a cancel ends it by
=====================  ==========================================  =====================
``add``                plain Celery task                           (not signal-aware)
``cooperative_job``    steps with checkpoints and progress         ``cooperative``
``sleepy_job``         one long ``time.sleep``                      ``interrupted``
``wait_for_io_job``    blocks reading a socket nobody writes to    ``interrupted``
``gil_job``            C code holding the GIL (``sum(range(n))``)  ``killed``
``plain_gil_job``      the same, not signal-aware                  (Celery's revoke only)
``write_records``      inserts rows inside one transaction         ``cooperative``, rollback
``sibling_job``        never cancelled; its result is checkable    (collateral check)
``workflow``           a chord of ``cooperative_job`` tasks        a cascade: every job
                       with ``summarize`` as its callback          stops, no callback
``render_report``      renders a ``Report`` (``delay_for``)        ``cancel_for(report)``
=====================  ==========================================  =====================

A workflow started through the API (``POST /api/tasks/`` with ``demo.tasks.workflow``)
is cancelled whole with ``POST /api/tasks/<its id>/cancel/?cascade=true``: its jobs stop,
its callback never runs.
"""

import time

from celery import chord, shared_task
from django.db import transaction

from demo.models import DemoRecord, Report
from tasksignal import shapes
from tasksignal.base import SignalAwareTask


@shared_task
def add(x: int, y: int) -> int:
    """Return ``x + y``: the smallest possible task, for smoke tests."""
    return x + y


def set_step_seconds(task, signal) -> None:
    """Handler of the demo's own signal kind: change a running job's pace."""
    task.run_state["step_seconds"] = float(signal.message)


@shared_task(base=SignalAwareTask, bind=True)
def cooperative_job(self, steps: int = 100, step_seconds: float = 0.1) -> dict:
    """Work in steps, checking for signals between them; pace changes with ``set_step_seconds``."""
    self.run_state["step_seconds"] = step_seconds
    for step in range(steps):
        self.checkpoint()
        time.sleep(self.run_state["step_seconds"])
        self.set_progress(step + 1, steps)
    return {"steps": steps, "step_seconds": self.run_state["step_seconds"]}


@shared_task(base=SignalAwareTask, bind=True)
def sleepy_job(self, seconds: float = 60.0) -> float:
    """Sleep without a single checkpoint: only an interrupt stops it early."""
    return shapes.sleep(seconds)


@shared_task(base=SignalAwareTask, bind=True)
def wait_for_io_job(self, seconds: float = 60.0) -> str:
    """Block on a socket read (as on a slow HTTP call); only an interrupt stops it early."""
    return shapes.block_on_socket(self, seconds)


@shared_task(base=SignalAwareTask, bind=True, kill_after=3.0)
def gil_job(self, n: int = 10**11) -> int:
    """Run C code that holds the GIL: no thread of this process runs until it returns."""
    return shapes.hold_the_gil(n)


@shared_task
def plain_gil_job(n: int = 10**11) -> int:
    """``gil_job`` without tasksignal: what Celery's own ``revoke(terminate=True)`` faces."""
    return shapes.hold_the_gil(n)


@shared_task(base=SignalAwareTask, bind=True)
def write_records(self, batch: str, rows: int = 20, step_seconds: float = 0.05) -> int:
    """Insert ``rows`` rows in one transaction; a cancel leaves none of them behind."""
    with transaction.atomic():
        for number in range(rows):
            self.checkpoint()
            DemoRecord.objects.create(batch=batch, number=number)
            time.sleep(step_seconds)
    return rows


@shared_task(base=SignalAwareTask, bind=True)
def sibling_job(self, seed: int, steps: int = 10, step_seconds: float = 0.05) -> int:
    """Never cancelled in the load test: must return ``seed * 2 + steps``."""
    return shapes.sibling(self, seed, steps, step_seconds)


@shared_task(base=SignalAwareTask, bind=True)
def workflow(
    self, jobs: int = 4, steps: int = 100, step_seconds: float = 0.05
) -> dict[str, object]:
    """Start a chord of ``jobs`` cooperative jobs whose callback is ``summarize``; return
    the ids of the jobs and of the callback (whose result is the workflow's). A cascade
    cancel of this task's id reaches every job, and the callback never runs."""
    header = [cooperative_job.si(steps, step_seconds) for _ in range(jobs)]
    callback = chord(header)(summarize.s())
    return {"jobs": [job.id for job in callback.parent.results], "callback": callback.id}


@shared_task(base=SignalAwareTask, bind=True)
def summarize(self, results: list[dict]) -> int:
    """The workflow's callback: how many steps its jobs did in all."""
    return sum(result["steps"] for result in results)


@shared_task(base=SignalAwareTask, bind=True)
def render_report(self, report_id: int, step_seconds: float = 0.05) -> int:
    """Render the pages of a :class:`~demo.models.Report` (start it with ``delay_for``,
    so that ``CeleryTaskSignal.objects.cancel_for(report)`` stops it)."""
    report = Report.objects.get(pk=report_id)
    for page in range(report.pages):
        self.checkpoint()
        time.sleep(step_seconds)
        self.set_progress(page + 1, report.pages)
    Report.objects.filter(pk=report_id).update(rendered_pages=report.pages)
    return report.pages
