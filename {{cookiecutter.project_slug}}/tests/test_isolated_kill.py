"""Why the kill step cannot hit the wrong task: freeze, read the slot, then decide.

These tests use real processes and the real ``kill_if_running``; only the final kill
is given as a callable, as the supervisor gives ``Request.terminate``.
"""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tasksignal.slots import read_slot
from tasksignal.supervisor import kill_if_running
from tests.conftest import wait_for

CHILD = """
import sys, time
from tasksignal.slots import RunSlot
slot = RunSlot()
slot.write(sys.argv[1])
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def process_running():
    started = []

    def start(task_id: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, task_id], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_process_that_moved_on_to_another_task_is_resumed_untouched(process_running):
    process = process_running("other-task")
    killed = kill_if_running(process.pid, "cancelled-task", lambda: os.kill(process.pid, 9))
    assert not killed, "killed a process that runs a different task"
    assert process.poll() is None, "the innocent process died"
    status = psutil.Process(process.pid).status()
    assert status != psutil.STATUS_STOPPED, "the innocent process was left frozen"


def test_process_still_running_the_cancelled_task_is_killed(process_running):
    process = process_running("cancelled-task")
    killed = kill_if_running(
        process.pid, "cancelled-task", lambda: os.kill(process.pid, signal.SIGKILL)
    )
    assert killed, "did not kill the process running the cancelled task"
    assert process.wait(5) == -signal.SIGKILL


def test_slot_is_read_while_the_process_is_frozen(process_running):
    process = process_running("cancelled-task")
    seen = {}

    def kill():
        seen["status"] = psutil.Process(process.pid).status()
        os.kill(process.pid, signal.SIGKILL)

    kill_if_running(process.pid, "cancelled-task", kill)
    assert seen["status"] == psutil.STATUS_STOPPED, "decided to kill a process that was not frozen"


def test_process_that_already_exited_is_not_killed(process_running):
    process = process_running("finished-task")
    process.kill()
    process.wait()
    wait_for(lambda: not psutil.pid_exists(process.pid), 5, "process to exit")
    calls = []
    assert kill_if_running(process.pid, "finished-task", lambda: calls.append(1)) is False
    assert calls == [], "tried to kill a process that no longer exists"


def test_slot_names_the_task_a_process_runs(process_running):
    process = process_running("some-task")
    assert read_slot(process.pid) == "some-task"
