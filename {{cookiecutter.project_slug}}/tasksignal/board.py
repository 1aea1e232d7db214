"""Mailboxes in shared memory: how a worker node and the processes running its tasks talk.

Each worker node (a ``celery worker`` main process) keeps one *board*: a file in
``/dev/shm`` mapped into its memory and into that of every pool process, holding a fixed
array of mailboxes, one per task the node has handed to its pool. A mailbox has two halves,
each with exactly one writer:

* the **node half**, written by the worker's main process: the task id, the signals the run
  must see (``post``), and a counter of interrupt requests;
* the **run half**, written by the process that executes the task: its pid, whether it runs
  or is paused, its progress, its database backend, and the signals it has handled (acks).

Nobody takes a lock the other side could hold and nobody makes a system call to talk:
``checkpoint()`` reads one byte (the node half's *attention* counter). Each half carries a
sequence counter that is odd while its writer is busy (a seqlock), so a reader can tell a
torn read and try again. The node allocates a run's mailbox before the task reaches the
pool, so the run always finds it; a run finds it by a hash of its task id (open addressing
with linear probing).

>>> import tempfile, pathlib
>>> board = Board.create(pathlib.Path(tempfile.mkdtemp()) / "doc.board", capacity=8)
>>> index = board.allocate("task-1")
>>> board.post(index, "task-1", [{"id": 7, "signal": "cancel_task", "message": ""}])
True
>>> mailbox = board.mailbox("task-1")
>>> mailbox.read_signals()[1]
[{'id': 7, 'signal': 'cancel_task', 'message': ''}]
>>> mailbox.report(run_state=RUNNING, pid=123)
>>> board.read_run(index, "task-1").pid
123
>>> board.free(index, "task-1")
>>> board.mailbox("task-1") is None
True
>>> board.close()
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasksignal.states import Outcome

#: Bytes of one mailbox: one memory page.
ENTRY_SIZE = 4096
HEADER = struct.Struct("<8sIIi")  # magic, capacity, entry size, the node's wake-up pipe
MAGIC = b"tsboard1"
MAX_TASK_ID = 256
MAX_SIGNALS_JSON = 2048
MAX_PROGRESS_MESSAGE = 255
MAX_ERROR = 190
ACK_SLOTS = 6

#: The stop outcomes a run half can report (index 0: it did not stop on a cancel).
STOP_OUTCOMES = ("", *Outcome.LADDER)
# Slot states.
EMPTY, USED, TOMBSTONE = 0, 1, 2
# Run states, as the run half reports them.
WAITING, RUNNING, PAUSED, ENDED = 0, 1, 2, 3

# -- node half ---------------------------------------------------------------------------
STATE_AT = 0  # u8
ATTENTION_AT = 1  # u8, wraps: runs compare for inequality
NODE = struct.Struct("<HIII H")  # task_id_len, node_seq, interrupts, acks_read, signals_len
NODE_AT = 2
TASK_ID_AT = 32
SIGNALS_AT = TASK_ID_AT + MAX_TASK_ID
# -- run half ----------------------------------------------------------------------------
RUN_AT = SIGNALS_AT + MAX_SIGNALS_JSON
SEQ = struct.Struct("<I")  # the run half's sequence counter, odd while its writer is busy
# pid, thread ident, run state, database backend pid, start (epoch), stop outcome index
IDENT = struct.Struct("<iQBidB")
IDENT_AT = RUN_AT + 4
PROGRESS = struct.Struct("<ddH")  # current, total (NaN: none), message length
PROGRESS_AT = IDENT_AT + IDENT.size
ACKS_WRITTEN = struct.Struct("<I")
ACKS_WRITTEN_AT = PROGRESS_AT + PROGRESS.size
PROGRESS_MESSAGE_AT = ACKS_WRITTEN_AT + ACKS_WRITTEN.size
ACK = struct.Struct("<qB15sH")  # signal id, outcome length, outcome, error length
ACK_SIZE = ACK.size + MAX_ERROR
ACKS_AT = PROGRESS_MESSAGE_AT + MAX_PROGRESS_MESSAGE + 1
assert ACKS_AT + ACK_SLOTS * ACK_SIZE <= ENTRY_SIZE  # a layout invariant

_SEQ_PACK, _SEQ_UNPACK = SEQ.pack_into, SEQ.unpack_from
_PROGRESS_PACK = PROGRESS.pack_into
_NAN = math.nan
IDENT_FIELDS = ("pid", "thread_ident", "run_state", "backend_pid", "started", "stop_outcome")

#: Seconds between two looks of the node at its runs' mailboxes (for their start and
#: progress: a run wakes the node for anything else). Writing progress more often than
#: this would only be overwritten unread.
POLL_INTERVAL = 0.25

#: How many times a reader looks again at a half that its writer is busy with: it spins
#: at first, then yields its CPU between looks (:func:`_wait_for_writer`), so that a writer
#: descheduled halfway through a write (64 processes on two CPUs) gets about 50 ms to
#: finish; a writer that never finishes (frozen, killed) fails the read after that.
TORN_READ_RETRIES = 300
_SPINS = 200


def _wait_for_writer(attempt: int) -> None:
    """Between two looks at a half being written: nothing at first, then a short sleep."""
    if attempt >= _SPINS:
        time.sleep(0.0005)


class BoardFull(RuntimeError):
    """Every mailbox is in use: more tasks in the pool than the board was sized for."""


@dataclass(frozen=True)
class RunReport:
    """What the run half of a mailbox says (a consistent snapshot)."""

    seq: int
    pid: int
    thread_ident: int
    run_state: int
    backend_pid: int
    started: float
    progress_current: float | None
    progress_total: float | None
    progress_message: str
    acks_written: int
    #: How a run that ended stopped (a rung of ``Outcome.LADDER``), or "" if it did not.
    stop_outcome: str


@dataclass(frozen=True)
class Ack:
    """A signal the run handled, and how (an outcome of ``states.Outcome``)."""

    signal_id: int
    outcome: str
    error: str


def board_dir() -> Path:
    """Where boards live: tmpfs when the machine has one, else the temp directory."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # noqa: S108
    return Path(base) / f"tasksignal-{os.getuid()}"


def board_path(node_pid: int) -> Path:
    """The board file of the worker node whose main process is ``node_pid``."""
    return board_dir() / f"{node_pid}.board"


def _slot_of(task_id: bytes, capacity: int) -> int:
    return zlib.crc32(task_id) % capacity


class Board:
    """A mapped board file; the node creates it, pool processes open it."""

    def __init__(self, path: Path, file_map: mmap.mmap, capacity: int, wake_fd: int) -> None:
        self.path = path
        self.capacity = capacity
        self.wake_fd = wake_fd
        self._map = file_map
        self.view = memoryview(file_map)
        # Node side only: allocation, posting and freeing happen on several threads of the
        # worker's main process. The run side never takes it.
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: Path, capacity: int, wake_fd: int = -1) -> Board:
        """Create (or replace) the board file at ``path`` with ``capacity`` mailboxes.

        ``wake_fd`` is the write end of a pipe the node's thread waits on: a run that ends
        writes its mailbox index there so the node records the end at once. Pool
        processes inherit the pipe from the node (forked after it), so the number is valid
        in them too.
        """
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        size = HEADER.size + capacity * ENTRY_SIZE
        size += -size % mmap.PAGESIZE
        with open(path, "w+b") as file:
            file.truncate(size)
            file_map = mmap.mmap(file.fileno(), size)
        HEADER.pack_into(file_map, 0, MAGIC, capacity, ENTRY_SIZE, wake_fd)
        return cls(path, file_map, capacity, wake_fd)

    @classmethod
    def open(cls, path: Path) -> Board | None:
        """Map an existing board; ``None`` if there is none (yet) or it is not a board."""
        try:
            with open(path, "r+b") as file:
                file_map = mmap.mmap(file.fileno(), 0)
        except (FileNotFoundError, ValueError):
            return None
        magic, capacity, entry_size, wake_fd = HEADER.unpack_from(file_map, 0)
        if magic != MAGIC or entry_size != ENTRY_SIZE:
            file_map.close()
            return None
        return cls(path, file_map, capacity, wake_fd)

    def close(self, *, remove: bool = False) -> None:
        """Unmap the board; ``remove`` also deletes its file (the node is going away)."""
        self.view.release()
        self._map.close()
        if remove:
            self.path.unlink(missing_ok=True)

    def _at(self, index: int) -> int:
        return HEADER.size + index * ENTRY_SIZE

    def _task_id_at(self, base: int) -> bytes:
        length = NODE.unpack_from(self._map, base + NODE_AT)[0]
        return bytes(self.view[base + TASK_ID_AT : base + TASK_ID_AT + length])

    # -- both sides --------------------------------------------------------------------
    def find(self, task_id: str) -> int | None:
        """The index of ``task_id``'s mailbox, or ``None``. Probes from the id's hash."""
        key = task_id.encode()
        start = _slot_of(key, self.capacity)
        for step in range(self.capacity):
            index = (start + step) % self.capacity
            base = self._at(index)
            state = self.view[base + STATE_AT]
            if state == EMPTY:
                return None
            if state == USED and self._task_id_at(base) == key:
                return index
        return None

    def mailbox(self, task_id: str) -> Mailbox | None:
        """The run side's handle on ``task_id``'s mailbox, or ``None``."""
        index = self.find(task_id)
        return None if index is None else Mailbox(self, index)

    # -- the node half (worker main process) --------------------------------------------
    def allocate(self, task_id: str) -> int:
        """Give ``task_id`` an empty mailbox and return its index (its existing one, if any).

        Raises :class:`BoardFull` when no mailbox is free and ``ValueError`` for a task id
        longer than the board stores.
        """
        key = task_id.encode()
        if len(key) > MAX_TASK_ID:
            raise ValueError(f"task id longer than {MAX_TASK_ID} bytes")
        with self._lock:
            existing = self.find(task_id)
            if existing is not None:
                return existing
            start = _slot_of(key, self.capacity)
            for step in range(self.capacity):
                index = (start + step) % self.capacity
                base = self._at(index)
                if self.view[base + STATE_AT] != USED:
                    self.view[base : base + ENTRY_SIZE] = bytes(ENTRY_SIZE)
                    NODE.pack_into(self._map, base + NODE_AT, len(key), 0, 0, 0, 0)
                    PROGRESS.pack_into(self._map, base + PROGRESS_AT, math.nan, math.nan, 0)
                    self.view[base + TASK_ID_AT : base + TASK_ID_AT + len(key)] = key
                    # Published last: a run probing meanwhile sees a whole entry or none.
                    self.view[base + STATE_AT] = USED
                    return index
        raise BoardFull(f"all {self.capacity} mailboxes are in use")

    def _owned(self, index: int, task_id: str) -> int | None:
        base = self._at(index)
        if self.view[base + STATE_AT] != USED or self._task_id_at(base) != task_id.encode():
            return None
        return base

    def post(self, index: int, task_id: str, signals: list[dict[str, Any]]) -> bool:
        """Put ``signals`` (the run's whole pending list) in the mailbox and raise attention.

        Messages too long for the mailbox are cut and marked ``truncated`` (the run reads
        the full text from the row when it needs it). Returns False when the mailbox is no
        longer ``task_id``'s.
        """
        data = _encode_signals(signals)
        with self._lock:
            base = self._owned(index, task_id)
            if base is None:
                return False
            length, seq, interrupts, acks_read, _ = NODE.unpack_from(self._map, base + NODE_AT)
            NODE.pack_into(self._map, base + NODE_AT, length, seq + 1, interrupts, acks_read, 0)
            self.view[base + SIGNALS_AT : base + SIGNALS_AT + len(data)] = data
            NODE.pack_into(
                self._map, base + NODE_AT, length, seq + 2, interrupts, acks_read, len(data)
            )
            self.view[base + ATTENTION_AT] = (self.view[base + ATTENTION_AT] + 1) % 256
            return True

    def request_interrupt(self, index: int, task_id: str) -> bool:
        """Count one more interrupt request for ``task_id``'s run; False if not its mailbox."""
        with self._lock:
            base = self._owned(index, task_id)
            if base is None:
                return False
            length, seq, interrupts, acks_read, signals_len = NODE.unpack_from(
                self._map, base + NODE_AT
            )
            NODE.pack_into(
                self._map,
                base + NODE_AT,
                length,
                seq + 2,
                interrupts + 1,
                acks_read,
                signals_len,
            )
            self.view[base + ATTENTION_AT] = (self.view[base + ATTENTION_AT] + 1) % 256
            return True

    def free(self, index: int, task_id: str) -> None:
        """Release ``task_id``'s mailbox (its request ended)."""
        with self._lock:
            base = self._owned(index, task_id)
            if base is None:
                return
            self.view[base + STATE_AT] = TOMBSTONE
            # A tombstone followed by an empty slot ends every probe chain through it: turn
            # it, and the tombstones before it, back into empty slots.
            while self.view[self._at((index + 1) % self.capacity) + STATE_AT] == EMPTY:
                self.view[self._at(index) + STATE_AT] = EMPTY
                index = (index - 1) % self.capacity
                if self.view[self._at(index) + STATE_AT] != TOMBSTONE:
                    break

    def read_run(self, index: int, task_id: str) -> RunReport | None:
        """A consistent snapshot of the run half, or ``None`` if not ``task_id``'s mailbox."""
        base = self._owned(index, task_id)
        return None if base is None else _read_run(self.view, self._map, base)

    def runs(self, index: int, task_id: str, pid: int) -> bool:
        """Whether the process ``pid`` is executing ``task_id`` now, by its mailbox.

        The proof the isolated kill asks for while the process is frozen (``kill.py``).
        """
        run = self.read_run(index, task_id)
        return run is not None and run.pid == pid and run.run_state in (RUNNING, PAUSED)

    def live_runs(self) -> int:
        """How many of the board's runs are executing (running or paused) right now.

        Read without the node's lock from any process that can open the board: the load
        test samples it to tell running tasks from queued ones.

        >>> import tempfile, pathlib
        >>> board = Board.create(pathlib.Path(tempfile.mkdtemp()) / "live.board", capacity=4)
        >>> _ = board.allocate("running"), board.allocate("queued")
        >>> board.mailbox("running").report(run_state=RUNNING, pid=1)
        >>> board.live_runs()
        1
        >>> board.close(remove=True)
        """
        live = 0
        for index in range(self.capacity):
            base = self._at(index)
            if self.view[base + STATE_AT] == USED:
                try:
                    run_state = _read_run(self.view, self._map, base).run_state
                except RuntimeError:  # rewritten all the time: a run reporting progress
                    run_state = RUNNING
                live += run_state in (RUNNING, PAUSED)
        return live

    def take_acks(self, index: int, task_id: str) -> list[Ack]:
        """The acks the run wrote since the last call, oldest first; frees their places."""
        with self._lock:
            base = self._owned(index, task_id)
            if base is None:
                return []
            report = _read_run(self.view, self._map, base)
            length, seq, interrupts, acks_read, signals_len = NODE.unpack_from(
                self._map, base + NODE_AT
            )
            acks = [
                _read_ack(self.view, base, number)
                for number in range(acks_read, report.acks_written)
            ]
            NODE.pack_into(
                self._map,
                base + NODE_AT,
                length,
                seq,
                interrupts,
                report.acks_written,
                signals_len,
            )
            return acks


class Mailbox:
    """The run side of one mailbox: what the process executing the task reads and writes.

    ``attention`` is the byte ``checkpoint()`` compares: it changes whenever the node
    posts signals or requests an interrupt.
    """

    __slots__ = ("_base", "_map", "_message", "_message_length", "board", "index", "view")

    def __init__(self, board: Board, index: int) -> None:
        self.board = board
        self.index = index
        self._base = board._at(index)
        self._map = board._map
        self.view = board.view
        self._message = ""
        self._message_length = 0

    @property
    def attention_at(self) -> int:
        """Offset of the attention byte in ``view`` (read it as ``view[attention_at]``)."""
        return self._base + ATTENTION_AT

    def read_signals(self) -> tuple[int, list[dict[str, Any]]]:
        """``(attention, signals)``: the node half's current signal list, read consistently."""
        base = self._base
        for attempt in range(TORN_READ_RETRIES):
            attention = self.view[base + ATTENTION_AT]
            _, seq, _, _, length = NODE.unpack_from(self._map, base + NODE_AT)
            if seq % 2:
                _wait_for_writer(attempt)
                continue
            data = bytes(self.view[base + SIGNALS_AT : base + SIGNALS_AT + length])
            if NODE.unpack_from(self._map, base + NODE_AT)[1] == seq:
                return attention, json.loads(data) if data else []
        raise RuntimeError("the node kept rewriting this mailbox")

    def interrupts(self) -> int:
        """How many interrupts the node has requested for this run."""
        interrupts: int = NODE.unpack_from(self._map, self._base + NODE_AT)[2]
        return interrupts

    def report(self, **fields: float | str | None) -> None:
        """Write fields of the run half: ``pid``, ``thread_ident``, ``run_state``,
        ``backend_pid``, ``started`` and ``stop_outcome`` (a rung of ``Outcome.LADDER``).
        """
        values = dict(
            zip(IDENT_FIELDS, IDENT.unpack_from(self._map, self._base + IDENT_AT), strict=True)
        )
        values.update(fields)
        if "stop_outcome" in fields:
            values["stop_outcome"] = STOP_OUTCOMES.index(fields["stop_outcome"])
        with self._writing():
            IDENT.pack_into(self._map, self._base + IDENT_AT, *values.values())

    def report_progress(self, current: float, total: float | None, message: str) -> None:
        """Write the run's progress. ``set_progress()`` calls it every step, with caches
        cold after the step's own work, so it does as little as it can: a few memory
        copies, the message only when it changed."""
        file_map, seq_at = self._map, self._base + RUN_AT
        seq = _SEQ_UNPACK(file_map, seq_at)[0]
        _SEQ_PACK(file_map, seq_at, seq + 1)
        if message != self._message:
            self._message = message
            text = message.encode()[:MAX_PROGRESS_MESSAGE]
            self._message_length = len(text)
            self.view[self._base + PROGRESS_MESSAGE_AT :][: len(text)] = text
        _PROGRESS_PACK(
            file_map,
            self._base + PROGRESS_AT,
            current,
            _NAN if total is None else total,
            self._message_length,
        )
        _SEQ_PACK(file_map, seq_at, seq + 2)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Bracket a write of the run half by its sequence counter (odd while writing)."""
        at = self._base + RUN_AT
        (seq,) = SEQ.unpack_from(self._map, at)
        SEQ.pack_into(self._map, at, seq + 1)
        try:
            yield
        finally:
            SEQ.pack_into(self._map, at, seq + 2)

    def wake_node(self) -> None:
        """Tell the node's thread to look at this mailbox now (the run acked or ended)."""
        if self.board.wake_fd >= 0:
            # On failure the node still polls its mailboxes, only a little later.
            with contextlib.suppress(OSError):
                os.write(self.board.wake_fd, struct.pack("<i", self.index))

    def ack(self, signal_id: int, outcome: str, error: str = "") -> None:
        """Tell the node that signal ``signal_id`` was handled with ``outcome``.

        Waits (polling) while all ack places are taken: the node frees them within its
        poll interval. Acks are rare (pause, resume, registered kinds), so this never
        slows a task that is not being signalled.
        """
        while True:
            report = _read_run(self.view, self._map, self._base)
            acks_read = NODE.unpack_from(self._map, self._base + NODE_AT)[3]
            if report.acks_written - acks_read < ACK_SLOTS:
                break
            time.sleep(0.005)
        slot = self._base + ACKS_AT + (report.acks_written % ACK_SLOTS) * ACK_SIZE
        name = outcome.encode()[:15]
        text = error.encode(errors="replace")[:MAX_ERROR]
        ACK.pack_into(self._map, slot, signal_id, len(name), name, len(text))
        self.view[slot + ACK.size : slot + ACK.size + len(text)] = text
        with self._writing():
            ACKS_WRITTEN.pack_into(self._map, self._base + ACKS_WRITTEN_AT, report.acks_written + 1)
        self.wake_node()


def _read_run(view: memoryview, file_map: mmap.mmap, base: int) -> RunReport:
    at = base + RUN_AT
    for attempt in range(TORN_READ_RETRIES):
        (seq,) = SEQ.unpack_from(file_map, at)
        if seq % 2:
            _wait_for_writer(attempt)
            continue
        pid, thread_ident, run_state, backend_pid, started, stop = IDENT.unpack_from(
            file_map, base + IDENT_AT
        )
        current, total, length = PROGRESS.unpack_from(file_map, base + PROGRESS_AT)
        (acks_written,) = ACKS_WRITTEN.unpack_from(file_map, base + ACKS_WRITTEN_AT)
        start = base + PROGRESS_MESSAGE_AT
        message = bytes(view[start : start + length])
        if SEQ.unpack_from(file_map, at)[0] != seq:
            continue
        return RunReport(
            seq=seq,
            pid=pid,
            thread_ident=thread_ident,
            run_state=run_state,
            backend_pid=backend_pid,
            started=started,
            progress_current=None if math.isnan(current) else current,
            progress_total=None if math.isnan(total) else total,
            progress_message=message.decode(errors="replace"),
            acks_written=acks_written,
            stop_outcome=STOP_OUTCOMES[stop],
        )
    raise RuntimeError("the run kept rewriting its mailbox")


def _read_ack(view: memoryview, base: int, number: int) -> Ack:
    slot = base + ACKS_AT + (number % ACK_SLOTS) * ACK_SIZE
    signal_id, name_len, name, error_len = ACK.unpack_from(view, slot)
    error = bytes(view[slot + ACK.size : slot + ACK.size + error_len])
    return Ack(signal_id, name[:name_len].decode(), error.decode(errors="replace"))


def _encode_signals(signals: list[dict[str, Any]]) -> bytes:
    """JSON for the mailbox; messages are cut (and flagged) until the whole list fits."""
    data = json.dumps(signals, separators=(",", ":")).encode()
    budget = MAX_SIGNALS_JSON // max(len(signals), 1) - 96
    if len(data) > MAX_SIGNALS_JSON:
        signals = [
            {**payload, "message": payload.get("message", "")[: max(budget, 0)], "truncated": True}
            if len(payload.get("message", "")) > budget
            else payload
            for payload in signals
        ]
        data = json.dumps(signals, separators=(",", ":")).encode()
    if len(data) > MAX_SIGNALS_JSON:
        raise ValueError(f"{len(signals)} signals do not fit in a mailbox")
    return data
