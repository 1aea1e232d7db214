"""Waiting for a task to stop, without polling: what the API's ``wait`` parameter runs on.

Every statement that completes a signal or ends a run announces it on the service's done
channel (``notify.done_channel()``), in the same statement, so the notice goes out exactly
when the fact commits. Each web process keeps one :class:`Hub`: a thread with a PostgreSQL
session of its own that listens on that channel and wakes the requests waiting for the
task a notice names. A waiting request gives its database connection back before it waits
(``django.db.connection.close()``; with the pool ``bin/web`` turns on, that is a return to
the pool) and its thread blocks on an event: it costs no CPU and no connection while it
waits, however many wait.

A request registers before it looks (``with hub.watch(task_id) as waiter``), so a stop
recorded between its look and its wait still wakes it. While the hub is disconnected
(PostgreSQL restarting) waiters are woken every :data:`RECHECK` seconds to look for
themselves, and once more when it is back.

>>> waiter = Waiter("abc")
>>> waiter.notify({"task_id": "abc", "ended": True})
>>> waiter.wait(lambda notice: notice.get("ended"), deadline=0.0)
{'task_id': 'abc', 'ended': True}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from django.db import connections
from django.http import HttpRequest

from tasksignal import notify

logger = logging.getLogger(__name__)

#: Seconds between two looks of a waiter at the database while the hub is disconnected.
RECHECK = 1.0
#: Seconds between two looks of a waiter at its client's socket (did it go away?).
CLIENT_CHECK = 2.0
#: Seconds a request waits for the hub's first ``LISTEN`` before it goes on without it.
LISTEN_TIMEOUT = 2.0
#: Seconds between two attempts of the hub to reconnect.
RECONNECT_DELAY = 1.0


class ClientGone(Exception):
    """The client of a waiting request closed its connection: stop waiting for it."""


def client_gone(request: HttpRequest) -> Callable[[], bool]:
    """A test of whether ``request``'s client hung up, for :meth:`Waiter.wait`.

    Under gunicorn the request knows its socket (``gunicorn.socket``): readable with nothing
    to read means the peer closed it. Elsewhere (the test client) it never says gone.
    """
    sock = request.META.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


class Waiter:
    """One request waiting for notices about one task."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self._event = threading.Event()
        self._notices: list[dict[str, Any]] = []

    def notify(self, notice: dict[str, Any]) -> None:
        """Hand the waiter a notice about its task (``{}``: look for yourself)."""
        self._notices.append(notice)
        self._event.set()

    def wait(
        self,
        matches: Callable[[dict[str, Any]], object],
        deadline: float,
        client_gone: Callable[[], bool] = lambda: False,
    ) -> dict[str, Any] | None:
        """The first notice for which ``matches(notice)`` is true, or ``None`` once the
        monotonic clock passes ``deadline``, the hub asks waiters to look for themselves,
        or ``client_gone()`` (looked at every :data:`CLIENT_CHECK` seconds) says nobody
        waits for the answer any more.
        """
        while True:
            while self._notices:
                notice = self._notices.pop(0)
                if not notice or matches(notice):
                    return notice or None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._event.clear()
            woken = self._notices or self._event.wait(min(remaining, CLIENT_CHECK))
            if not woken and client_gone():
                raise ClientGone(self.task_id)


class Hub:
    """The listener of one web process; use the module's :data:`hub`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._pid: int | None = None
        self._listening = threading.Event()

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[Waiter]:
        """Register a waiter for ``task_id`` for the duration of the block."""
        self._ensure_started()
        waiter = Waiter(task_id)
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(task_id, set())
                waiters.discard(waiter)
                if not waiters:
                    self._waiters.pop(task_id, None)

    def waiting(self) -> int:
        """How many requests of this process wait now."""
        return sum(len(waiters) for waiters in list(self._waiters.values()))

    def _ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():  # a new process (gunicorn forks its workers)
                self._pid = os.getpid()
                self._listening = threading.Event()
                self._waiters = {}
                thread = threading.Thread(target=self._run, name="tasksignal-hub", daemon=True)
                thread.start()
        self._listening.wait(LISTEN_TIMEOUT)

    def _run(self) -> None:
        channel = notify.done_channel()
        while True:
            try:
                self._listen(channel)
            except (psycopg.Error, OSError) as exc:
                logger.warning("waiting hub lost PostgreSQL (%s); waiters poll meanwhile", exc)
            self._listening.clear()
            deadline = time.monotonic() + RECONNECT_DELAY
            while time.monotonic() < deadline:
                self._wake_all()
                time.sleep(min(RECHECK, RECONNECT_DELAY))

    def _listen(self, channel: str) -> None:
        params = connections["default"].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        with psycopg.connect(
            **params, autocommit=True, application_name="tasksignal waiting hub"
        ) as session:
            session.execute(f'LISTEN "{channel}"')  # a hash in hex: nothing to escape
            self._listening.set()
            self._wake_all()  # notices may have been missed while disconnected
            while True:
                select.select([session.fileno()], [], [], RECHECK)
                for notice in session.notifies(timeout=0):
                    self._dispatch(notice.payload)

    def _dispatch(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
            task_id = notice["task_id"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a done notice: %r", payload)
            return
        for waiter in list(self._waiters.get(task_id, ())):
            waiter.notify(notice)

    def _wake_all(self) -> None:
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):
                waiter.notify({})


#: The hub of this process.
hub = Hub()
