"""Every name tasksignal gives a signal's outcome, a run's state or a message header, in
one module that imports nothing (as ``celery.states`` does for Celery's states).

Code compares against these constants, never against string literals; the models take
their choices (value and human label) from here.

>>> from tasksignal.states import Outcome, RunState
>>> Outcome.COOPERATIVE in Outcome.STOPPED
True
>>> RunState.SUCCEEDED in RunState.FINISHED
True
>>> RunState.OF_CELERY_STATE["REVOKED"]
'cancelled'
>>> dict(Outcome.CHOICES)[Outcome.SKIPPED]
'Cancelled before it started'
>>> Source.API in dict(Source.CHOICES)
True
"""


class Outcome:
    """What became of a signal (``CeleryTaskSignal.outcome``)."""

    #: A cancel: the task stopped at a checkpoint.
    COOPERATIVE = "cooperative"
    #: A cancel: the task was interrupted where it was (no checkpoint within cancel_grace).
    INTERRUPTED = "interrupted"
    #: A cancel: the task's process was killed, in isolation, after kill_after.
    KILLED = "killed"
    #: A cancel: the task never started; its body did not run.
    SKIPPED = "skipped"
    #: The task had already finished when the signal reached it.
    TOO_LATE = "too_late"
    #: The task never showed up before the signal expired.
    EXPIRED = "expired"
    #: A pause: the task is blocked at its checkpoint.
    PAUSED = "paused"
    #: A resume: the paused task carries on.
    RESUMED = "resumed"
    #: A resume of a task that was not paused.
    NOT_PAUSED = "not_paused"
    #: A signal of a registered kind whose handler ran.
    HANDLED = "handled"
    #: A signal of a registered kind whose handler raised (the reason is kept on the row).
    FAILED = "failed"

    CHOICES = (
        (COOPERATIVE, "Stopped at a checkpoint"),
        (INTERRUPTED, "Interrupted"),
        (KILLED, "Killed"),
        (SKIPPED, "Cancelled before it started"),
        (TOO_LATE, "Task had already finished"),
        (EXPIRED, "Task never ran"),
        (PAUSED, "Paused"),
        (RESUMED, "Resumed"),
        (NOT_PAUSED, "Was not paused"),
        (HANDLED, "Handled by the task"),
        (FAILED, "Handler failed"),
    )
    #: The rungs of the cancel ladder, in the order a cancel escalates.
    LADDER = (SKIPPED, COOPERATIVE, INTERRUPTED, KILLED)
    #: The outcomes of a cancel that stopped its task.
    STOPPED = frozenset(LADDER)


class RunState:
    """What a run is doing (``TaskRun.state``)."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    CHOICES = (
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (PAUSED, "Paused"),
        (SUCCEEDED, "Succeeded"),
        (FAILED, "Failed"),
        (CANCELLED, "Cancelled"),
    )
    #: States after which nothing more happens to the run.
    FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
    #: States of a run a worker process is executing.
    LIVE = frozenset({RUNNING, PAUSED})
    #: The run state of each of Celery's ready states (``celery.states``; a task that is
    #: not signal-aware, or whose node died, is known to have ended only by its result).
    OF_CELERY_STATE = {"SUCCESS": SUCCEEDED, "FAILURE": FAILED, "REVOKED": CANCELLED}


class Source:
    """How a signal was sent (``CeleryTaskSignal.source``): who asked is ``requested_by``."""

    #: From the Django admin (a row's button, an action, the add form).
    ADMIN = "admin"
    #: Through the JSON API.
    API = "api"
    #: With ``manage.py tasksignal``.
    CLI = "cli"
    #: By Python code calling ``CeleryTaskSignal.objects.send()`` (the default).
    CODE = "code"

    CHOICES = (
        (ADMIN, "Admin"),
        (API, "API"),
        (CLI, "Command line"),
        (CODE, "Code"),
    )


#: The message header a producer sets on a task whose run it recorded (``queued``): the
#: worker node then keeps that record true even for a task that is not signal-aware.
RECORDED_HEADER = "tasksignal_recorded"

#: The message header that carries a task's lineage: the ids of the tasks, groups and
#: chords it descends from, oldest first (``lineage.py``). A worker node reads it at
#: admission to skip a task whose ancestor was cancelled with ``cascade=True``.
LINEAGE_HEADER = "tasksignal_lineage"
