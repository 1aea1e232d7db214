"""Why the kill step cannot hit the wrong task: freeze, ask the mailbox, then decide.

These tests use real processes, a real board and the real ``kill_if_running`` with the
proof the node gives it (``Board.runs``); only the final kill is given as a callable, as
the node gives ``Request.terminate``.
"""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tasksignal.board import Board
from tasksignal.kill import kill_if_running
from tests.conftest import wait_for

CHILD = """
import sys, time
from pathlib import Path
from tasksignal.board import Board, RUNNING
mailbox = Board.open(Path(sys.argv[1])).mailbox(sys.argv[2])
mailbox.report(pid=__import__("os").getpid(), run_state=RUNNING)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def board(tmp_path):
    board = Board.create(tmp_path / "node.board", capacity=16)
    yield board
    board.close(remove=True)


@pytest.fixture
def process_running(board):
    started = []

    def start(task_id: str) -> tuple[subprocess.Popen, int]:
        index = board.allocate(task_id)
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(board.path), task_id],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "ready"
        started.append(process)
        return process, index

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_process_that_moved_on_to_another_task_is_resumed_untouched(board, process_running):
    process, _ = process_running("other-task")
    cancelled = board.allocate("cancelled-task")  # its run never began in this process
    killed = kill_if_running(
        process.pid,
        lambda: board.runs(cancelled, "cancelled-task", process.pid),
        lambda: os.kill(process.pid, signal.SIGKILL),
    )
    assert not killed, "killed a process that runs a different task"
    assert process.poll() is None, "the innocent process died"
    status = psutil.Process(process.pid).status()
    assert status != psutil.STATUS_STOPPED, "the innocent process was left frozen"


def test_process_still_running_the_cancelled_task_is_killed(board, process_running):
    process, index = process_running("cancelled-task")
    killed = kill_if_running(
        process.pid,
        lambda: board.runs(index, "cancelled-task", process.pid),
        lambda: os.kill(process.pid, signal.SIGKILL),
    )
    assert killed, "did not kill the process running the cancelled task"
    assert process.wait(5) == -signal.SIGKILL


def test_mailbox_is_read_while_the_process_is_frozen(board, process_running):
    process, index = process_running("cancelled-task")
    seen = {}

    def still_runs_it() -> bool:
        seen["status"] = psutil.Process(process.pid).status()
        return board.runs(index, "cancelled-task", process.pid)

    kill_if_running(process.pid, still_runs_it, lambda: os.kill(process.pid, signal.SIGKILL))
    assert seen["status"] == psutil.STATUS_STOPPED, "decided to kill a process that was not frozen"


def test_process_that_already_exited_is_not_killed(board, process_running):
    process, index = process_running("finished-task")
    process.kill()
    process.wait()
    wait_for(lambda: not psutil.pid_exists(process.pid), 5, "process to exit")
    calls = []
    proof = lambda: board.runs(index, "finished-task", process.pid)  # noqa: E731
    assert kill_if_running(process.pid, proof, lambda: calls.append(1)) is False
    assert calls == [], "tried to kill a process that no longer exists"


def test_mailbox_names_the_process_that_runs_a_task(board, process_running):
    process, index = process_running("some-task")
    assert board.runs(index, "some-task", process.pid)
    assert not board.runs(index, "some-task", process.pid + 1)
