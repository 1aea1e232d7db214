"""The last rung of the ladder: kill a cancelled task that is still running, and only it.

Only the worker's main process can act on a pool process whose task holds the GIL in C
code (no thread inside that process can run then), and only it may replace a pool
process, so the worker node calls :func:`kill_if_running` from its main thread once the
task's ``kill_after`` deadline has passed:

1. ``SIGSTOP`` the process and wait until the kernel reports it stopped (the signal is
   delivered asynchronously). A stopped process cannot change its memory or start a task.
2. Ask the task's mailbox (``board.py``) whether this process still runs this task. If it
   moved on (the run ended, another began), ``SIGCONT`` it and do nothing. This is the
   synchronisation step that ``revoke(terminate=True)`` lacks: it signals whatever the pid
   runs by the time the signal lands.
3. Otherwise kill the processes the task started, then the process itself (the node uses
   Celery's ``Request.terminate(pool, SIGKILL)``, so Celery records the run as ``REVOKED``
   and billiard starts a fresh process).
"""

import logging
import os
import signal
import time
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)

#: Seconds to wait for a process to be seen stopped after SIGSTOP.
STOP_TIMEOUT = 0.5


def kill_if_running(pid: int, still_runs_it: Callable[[], bool], kill: Callable[[], None]) -> bool:
    """Freeze ``pid``; if ``still_runs_it()`` then, kill its descendants and call ``kill()``.

    Otherwise the process moved on to other work: it is resumed untouched. Returns whether
    it was killed. ``kill`` must end the frozen process (SIGKILL works on a stopped one).

    >>> import subprocess, sys
    >>> child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    >>> kill_if_running(child.pid, lambda: False, lambda: None)   # moved on: resumed
    False
    >>> kill_if_running(child.pid, lambda: True, lambda: os.kill(child.pid, signal.SIGKILL))
    True
    >>> child.wait()
    -9
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    killed = False
    try:
        # SIGSTOP is delivered asynchronously: until the process is seen stopped it may still
        # be finishing one task and starting the next, so its mailbox proves nothing yet.
        if not _wait_until_stopped(pid) or not still_runs_it():
            return False
        for descendant in _descendants(pid):
            descendant.kill()
        kill()
        killed = True
    finally:
        if not killed:
            os.kill(pid, signal.SIGCONT)
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
