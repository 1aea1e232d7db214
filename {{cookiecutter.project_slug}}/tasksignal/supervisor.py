"""The last step of the ladder: kill a cancelled task that is still running, and only it.

A worker bootstep, so it lives in the worker's main process, the one process that can act
on a child whose task holds the GIL in C code (no thread inside that child can run then).
Every ``SUPERVISE_INTERVAL`` it asks the database which of this worker's running
signal-aware tasks have a pending cancel, and schedules a check ``kill_after`` seconds
after the later of the cancel (its age comes from the database clock, so the deadline is
exact even when the cancel is learnt late) and the task's start (a task cancelled while
queued skips itself). At the deadline, if the task is still running:

1. ``SIGSTOP`` the child and wait until the kernel reports it stopped (the signal is
   delivered asynchronously). A stopped process cannot change its memory or start a task.
2. Read the child's slot (``slots.py``). If it names another task, or none, the child
   moved on: ``SIGCONT`` it and do nothing. This is the synchronisation step that
   ``revoke(terminate=True)`` lacks (it signals whatever the pid runs by then).
3. Otherwise kill the processes the task started, then the child with
   ``Request.terminate(pool, SIGKILL)``: Celery records the run as ``REVOKED`` and
   billiard starts a fresh child. The signal row is completed with outcome ``killed``.

Timer callbacks run in the worker's event loop, the same thread that owns the requests
and the pool, so no lock is needed around them.
"""

import logging
import os
import signal
import time

import psutil
from celery import bootsteps
from celery.worker import state as worker_state

from tasksignal.slots import read_slot, slot_dir, slot_path

logger = logging.getLogger(__name__)

#: Seconds between looks at this worker's cancelled tasks; a deadline learnt late is
#: still met because it is computed from the cancel's age.
SUPERVISE_INTERVAL = 0.5
#: Seconds before checking again a task past its deadline that was not killable yet.
RETRY_INTERVAL = 0.1
#: Seconds to wait for a process to be seen stopped after SIGSTOP.
STOP_TIMEOUT = 0.5


class CancelSupervisor(bootsteps.StartStopStep):
    """Worker bootstep that kills cancelled tasks past their ``kill_after`` deadline."""

    requires = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.worker = worker
        self.deadlines: dict[str, object] = {}
        self.tref = None

    def start(self, worker) -> None:
        """Begin watching; runs once the pool exists."""
        _remove_stale_slots()
        self.tref = worker.timer.call_repeatedly(SUPERVISE_INTERVAL, self.supervise)

    def stop(self, worker) -> None:
        """Stop watching and drop scheduled checks."""
        for entry in [self.tref, *self.deadlines.values()]:
            if entry is not None:
                entry.cancel()
        self.deadlines.clear()

    def supervise(self) -> None:
        """Schedule a kill check for each running task with a pending cancel."""
        from django.db import DatabaseError, connections

        try:
            self._schedule_deadlines()
        except DatabaseError as exc:
            logger.warning("cancel supervisor cannot read signals: %s", exc)
            connections["default"].close()
        except Exception:
            logger.exception("cancel supervisor error; carrying on")

    def _schedule_deadlines(self) -> None:
        from django.db.models import DurationField, ExpressionWrapper, F
        from django.db.models.functions import Now

        from tasksignal.base import SignalAwareTask
        from tasksignal.models import CeleryTaskSignal

        running = {
            request.id: request
            for request in list(worker_state.active_requests)
            if request.worker_pid
            and request.worker_pid != os.getpid()  # solo/threads pools: never kill the worker
            and isinstance(request.task, SignalAwareTask)
        }
        for task_id in [t for t in self.deadlines if t not in running]:
            self.deadlines.pop(task_id).cancel()
        unscheduled = [task_id for task_id in running if task_id not in self.deadlines]
        if not unscheduled:
            return
        cancels = (
            CeleryTaskSignal.objects.pending(signal=CeleryTaskSignal.CANCEL_TASK)
            .filter(task_id__in=unscheduled)
            .annotate(age=ExpressionWrapper(Now() - F("created"), output_field=DurationField()))
            .values_list("task_id", "id", "age")
        )
        for task_id, signal_id, age in cancels:
            kill_after = running[task_id].task.resolved_kill_after()
            # From the later of the cancel and the start: a task cancelled while it waited
            # in the queue skips itself when it starts and must not be killed instead.
            since_start = time.time() - running[task_id].time_start  # Celery's wall clock
            delay = max(0.0, kill_after - min(age.total_seconds(), since_start))
            self.deadlines[task_id] = self.worker.timer.call_after(
                delay, self.kill_if_still_running, (task_id, signal_id)
            )

    def kill_if_still_running(self, task_id: str, signal_id: int) -> bool:
        """Kill the child running ``task_id`` if, frozen, it is proven to still run it.

        When it does not kill, it checks again after ``RETRY_INTERVAL`` for as long as the
        task stays active (for example while the child is still starting it).
        """
        self.deadlines.pop(task_id, None)
        request = next((r for r in list(worker_state.active_requests) if r.id == task_id), None)
        if request is None:
            return False  # it ended
        pid = request.worker_pid
        if not pid or not kill_if_running(
            pid, task_id, lambda: request.terminate(self.worker.pool, "SIGKILL")
        ):
            # Not started in its process yet, or the process is between tasks: look again soon.
            logger.debug("task %s is past its kill deadline but not killable yet", task_id)
            self.deadlines[task_id] = self.worker.timer.call_after(
                RETRY_INTERVAL, self.kill_if_still_running, (task_id, signal_id)
            )
            return False
        self._record_kill(task_id, request.name, signal_id)
        logger.warning("killed pid %s to stop cancelled task %s", pid, task_id)
        return True

    @staticmethod
    def _record_kill(task_id: str, task_name: str, signal_id: int) -> None:
        from django.utils import timezone

        from tasksignal.models import CeleryTaskSignal, TaskRun

        CeleryTaskSignal.objects.filter(pk=signal_id).complete(CeleryTaskSignal.Outcome.KILLED)
        # The killed process may never have flushed its record (its GIL was held).
        TaskRun.objects.update_or_create(
            task_id=task_id,
            defaults={"state": TaskRun.State.CANCELLED, "finished_at": timezone.now()},
            create_defaults={
                "task_name": task_name,
                "state": TaskRun.State.CANCELLED,
                "finished_at": timezone.now(),
            },
        )


def kill_if_running(pid: int, task_id: str, kill) -> bool:
    """Freeze ``pid``; if its slot names ``task_id``, kill its descendants and call ``kill()``.

    Otherwise the process moved on to other work: it is resumed untouched. Returns whether
    it was killed. ``kill`` must end the frozen process (SIGKILL works on a stopped one).
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    killed = False
    try:
        # SIGSTOP is delivered asynchronously: until the process is seen stopped it may still
        # be finishing one task and starting the next, so its slot proves nothing yet.
        if not _wait_until_stopped(pid):
            return False
        running_now = read_slot(pid)
        if running_now != task_id:
            logger.info("not killing pid %s: it runs %s now, not %s", pid, running_now, task_id)
            return False
        for descendant in _descendants(pid):
            descendant.kill()
        kill()
        killed = True
    finally:
        if not killed:
            os.kill(pid, signal.SIGCONT)
    slot_path(pid).unlink(missing_ok=True)
    return True


def _wait_until_stopped(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Wait until ``pid`` is in the stopped state; False if it is not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                return True
        except psutil.NoSuchProcess:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _remove_stale_slots() -> None:
    """Delete slots of processes that no longer exist (children killed by time limits)."""
    if not slot_dir().is_dir():
        return
    for path in slot_dir().glob("*.slot"):
        if path.stem.isdigit() and not psutil.pid_exists(int(path.stem)):
            path.unlink(missing_ok=True)
