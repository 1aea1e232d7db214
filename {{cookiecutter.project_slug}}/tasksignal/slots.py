"""Which task each prefork child is running, readable by the worker's main process.

Each child maps a small file in shared memory and writes its current task id there when a
run starts (a memory copy, no system call) and blanks it when the run ends. The main
process reads a child's slot only after stopping it with SIGSTOP: a stopped process
cannot change its memory, so what the slot says is what the child is doing, and a kill
decided on it cannot hit a task that started in between. See ``supervisor.py``.
"""

import mmap
import os
import tempfile
from pathlib import Path

SLOT_SIZE = 256


def slot_dir() -> Path:
    """Where slots live: tmpfs when the machine has one, else the temp directory."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # noqa: S108
    return Path(base) / f"tasksignal-{os.getuid()}"


def slot_path(pid: int) -> Path:
    """The slot file of the process ``pid``."""
    return slot_dir() / f"{pid}.slot"


class RunSlot:
    """This process's slot: ``write(task_id)`` at run start, ``clear()`` at run end."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.path = slot_path(self.pid)
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        with open(self.path, "w+b") as file:
            file.truncate(SLOT_SIZE)
            self._map = mmap.mmap(file.fileno(), SLOT_SIZE)

    def write(self, task_id: str) -> None:
        """Record that this process now runs ``task_id``."""
        self._map[:] = task_id.encode()[:SLOT_SIZE].ljust(SLOT_SIZE, b"\0")

    def clear(self) -> None:
        """Record that this process runs no task."""
        self._map[:] = bytes(SLOT_SIZE)

    def remove(self) -> None:
        """Delete the slot file (the process is exiting)."""
        self._map.close()
        self.path.unlink(missing_ok=True)


def read_slot(pid: int) -> str | None:
    """The task id the process ``pid`` says it runs, or None (no task, or no slot)."""
    try:
        data = slot_path(pid).read_bytes()
    except FileNotFoundError:
        return None
    return data.rstrip(b"\0").decode(errors="replace") or None
