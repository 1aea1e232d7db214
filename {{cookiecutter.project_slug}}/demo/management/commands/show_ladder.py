"""``python manage.py show_ladder``: the guarantee in one table (``make demo`` runs it).

Against a running worker (four processes or more), it starts a job of each shape next to a
sibling nobody cancels, cancels each job once it runs, and prints for each the ladder step
that stopped it, the latency on the database clock, whether its cleanup ran, and the
sibling's result. Then it gives the GIL-holding job to Celery's ``revoke(terminate=True)``
for contrast (the same job without tasksignal): what Celery reports, and whether the
process really stopped. Exits 0 only
when every line is as it should be.
"""

import os
import signal
import time
import uuid

from celery import current_app
from django.core.management.base import BaseCommand, CommandError

from demo.models import DemoRecord
from demo.tasks import (
    cooperative_job,
    gil_job,
    plain_gil_job,
    sibling_job,
    sleepy_job,
    wait_for_io_job,
    write_records,
)
from tasksignal.models import CeleryTaskSignal
from tasksignal.states import Outcome
from tasksignal.testing import running_pid

#: The batch of rows ``write_records`` inserts in its transaction (none may be left).
BATCH = f"make-demo-{uuid.uuid4().hex[:8]}"
#: What each job is, how it starts, and the step of the ladder that must stop it.
JOBS = (
    (
        "cooperative (checkpoints)",
        lambda: cooperative_job.delay(steps=600, step_seconds=0.05),
        Outcome.COOPERATIVE,
    ),
    ("rows in a transaction", lambda: write_records.delay(BATCH, rows=600), Outcome.COOPERATIVE),
    ("asleep in time.sleep", lambda: sleepy_job.delay(seconds=60), Outcome.INTERRUPTED),
    ("blocked on a socket", lambda: wait_for_io_job.delay(seconds=60), Outcome.INTERRUPTED),
    ("C code holding the GIL", lambda: gil_job.delay(), Outcome.KILLED),
)
SEED, STEPS = 21, 40


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Command(BaseCommand):
    help = "Cancel a job of each shape next to a sibling; show how each stopped."

    def handle(self, *args, **options):
        sibling = sibling_job.delay(SEED, steps=STEPS, step_seconds=0.05)
        started = [(name, start(), step) for name, start, step in JOBS]
        rows, wrong = [], []
        for name, result, step in started:
            self._wait_running(result, name)
            cancel = self._wait_completed(
                CeleryTaskSignal.objects.cancel(result.id, message="make demo"), name
            )
            latency_ms = (cancel.completed_at - cancel.created).total_seconds() * 1000
            state = self._wait_state(result)
            reason = str(result.result) if state == "REVOKED" else state
            if cancel.outcome == Outcome.KILLED:
                cleanup = "none in-process (killed)"
            else:
                cleanup = "failed" if "cleanup failed" in reason else "ran"
            if name == "rows in a transaction":
                left = DemoRecord.objects.filter(batch=BATCH).count()
                cleanup += f", {left} rows left"
                cleanup = "failed" if left else cleanup
            ok = cancel.outcome == step and cleanup != "failed" and state == "REVOKED"
            verdict = "ok" if ok else "WRONG"
            rows.append((name, cancel.outcome, f"{latency_ms:,.0f} ms", cleanup, verdict))
            if not ok:
                wrong.append(name)
        value = sibling.get(timeout=60)
        sibling_ok = value == SEED * 2 + STEPS
        self._table(("job", "stopped by", "latency", "cleanup", ""), rows)
        self.stdout.write(
            f"sibling started next to them returned {value} (expected {SEED * 2 + STEPS}): "
            + ("ok" if sibling_ok else "WRONG")
        )
        contrast_ok = self._contrast()
        if wrong or not sibling_ok or not contrast_ok:
            raise CommandError(f"not as it should be: {', '.join(wrong) or 'see above'}")
        self.stdout.write(self.style.SUCCESS("every job stopped by its step, nothing else harmed"))

    def _contrast(self) -> bool:
        """The GIL-holding job without tasksignal, under Celery's revoke(terminate=True)."""
        result = plain_gil_job.delay()
        pid = self._wait_active(result)
        sent = time.monotonic()
        current_app.control.revoke(result.id, terminate=True)
        while result.state != "REVOKED" and time.monotonic() - sent < 10:
            time.sleep(0.01)
        reported_ms = (time.monotonic() - sent) * 1000
        time.sleep(3)
        still = _alive(pid)
        self.stdout.write(
            f"\nrevoke(terminate=True) of the same C code without tasksignal: Celery says "
            f"{result.state} after {reported_ms:,.0f} ms; 3 s later process {pid} "
            + (
                "still runs it (SIGTERM waits for the GIL; no cleanup, no record)"
                if still
                else "is gone"
            )
        )
        # Celery considers it done and will not signal it again; only SIGKILL to the pid
        # stops it (the pool then replaces the process). Leave nothing running.
        if still:
            os.kill(pid, signal.SIGKILL)
            self.stdout.write(f"only SIGKILL to pid {pid} stops it; the pool starts another")
        return result.state == "REVOKED"

    def _wait_state(self, result, timeout: float = 5) -> str:
        """Celery's state of a stopped run once the result backend says ``REVOKED``: the
        worker's main process records a kill a moment after the signal is completed."""
        deadline = time.monotonic() + timeout
        while result.state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.05)
        return result.state

    def _wait_active(self, result, timeout: float = 30) -> int:
        """The pid of the pool process running a plain task, as the worker reports it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for tasks in (current_app.control.inspect(timeout=1).active() or {}).values():
                for task in tasks:
                    if task["id"] == result.id and task.get("worker_pid"):
                        return task["worker_pid"]
            time.sleep(0.2)
        raise CommandError(f"the contrast job did not start within {timeout:.0f} s")

    def _wait_running(self, result, name: str, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = running_pid(result.id)
            if pid:
                return pid
            time.sleep(0.05)
        raise CommandError(f"{name} did not start within {timeout:.0f} s: is a worker running?")

    def _wait_completed(self, signal, name: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            signal.refresh_from_db()
            if signal.completed:
                return signal
            time.sleep(0.05)
        raise CommandError(f"the cancel of {name} was not completed within {timeout:.0f} s")

    def _table(self, header, rows) -> None:
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            self.stdout.write(
                "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
            )
