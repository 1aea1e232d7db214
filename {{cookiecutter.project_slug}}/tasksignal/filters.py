"""Runs picked by what they are: their task's name, state, worker and age.

The command line (``manage.py tasksignal cancel --task ... --older-than 10m``), the API
(``POST /api/cancels/``) and the admin's filtered list pick runs this way, then signal
them all at once (``cascade.send_to_all``).

>>> parse_age("90")
datetime.timedelta(seconds=90)
>>> parse_age("10m"), parse_age("2h"), parse_age("1d")
(datetime.timedelta(seconds=600), datetime.timedelta(seconds=7200), datetime.timedelta(days=1))
>>> parse_age("soon")
Traceback (most recent call last):
  ...
ValueError: 'soon' is not an age: a number of seconds, or a number with s, m, h or d
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING

from django.utils import timezone

from tasksignal.states import RunState

if TYPE_CHECKING:
    from tasksignal.models import TaskRunQuerySet

#: An age as the API documents it: at most 99999 of a unit (273 years: any longer is
#: before the calendar's start once taken from now).
AGE_PATTERN = r"^(\d{1,5}(?:\.\d{1,3})?)([smhd]?)$"
#: The states a run picked for a signal may be in.
UNFINISHED_STATES = tuple(sorted(set(dict(RunState.CHOICES)) - RunState.FINISHED))
_AGE = re.compile(AGE_PATTERN)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    """An age written as seconds (``90``) or with a unit (``90s``, ``10m``, ``2h``, ``1d``).

    Raises ``ValueError`` for anything else."""
    match = _AGE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not an age: a number of seconds, or a number with s, m, h or d"
        )
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def runs_matching(
    name: str | None = None,
    state: str | None = None,
    worker: str | None = None,
    older_than: timedelta | None = None,
) -> TaskRunQuerySet:
    """The unfinished runs of task ``name``, in ``state`` (a ``RunState`` that is not
    finished), on ``worker``, started more than ``older_than`` ago; ``None`` leaves a
    criterion out. Raises ``ValueError`` for a state that names no unfinished state."""
    from tasksignal.models import TaskRun

    runs = TaskRun.objects.unfinished()
    if state is not None:
        if state not in UNFINISHED_STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(UNFINISHED_STATES)}")
        runs = runs.filter(state=state)
    if name is not None:
        runs = runs.filter(task_name=name)
    if worker is not None:
        runs = runs.filter(worker=worker)
    if older_than is not None:
        runs = runs.filter(started_at__lt=timezone.now() - older_than)
    return runs
