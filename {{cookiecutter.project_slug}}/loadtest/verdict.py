"""What the cancel storm judges: whether a cancel was honoured, a sibling unharmed, the run
good enough. Plain functions over the API's answers and the run's counts, with no Locust,
Django or network in them, so the project's tests check them directly
(``tests/test_loadtest_verdict.py``).

A cancel is *honoured* when the task stopped by the rung of the ladder its shape needs (or
was ``skipped``: cancelled before it started) within that rung's deadline, measured by the
server's own clock (``latency_ms``: the cancel's creation to the stop, both on the database
clock). A sibling, a task nobody cancels, must return exactly its expected result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasksignal.states import Outcome

COOPERATIVE, INTERRUPTED, KILLED, SKIPPED = (
    Outcome.COOPERATIVE,
    Outcome.INTERRUPTED,
    Outcome.KILLED,
    Outcome.SKIPPED,
)
#: The rungs of the ladder, in the order a cancel escalates.
LADDER = Outcome.LADDER
#: Outcomes of a cancel that reached a task already running.
RUNNING_STOPS = (COOPERATIVE, INTERRUPTED, KILLED)
FAILED_STATES = ("SUCCESS", "FAILURE")


@dataclass(frozen=True)
class Deadlines:
    """Seconds each rung may take; built from the server's ``cancel_grace`` and the GIL
    task's ``kill_after``, plus slack for a loaded machine.

    >>> Deadlines(cancel_grace=1.0, kill_after=3.0).seconds(INTERRUPTED)
    3.0
    """

    cancel_grace: float = 1.0
    kill_after: float = 3.0
    cooperative: float = 3.0
    slack: float = 2.0
    skip: float = 10.0

    def seconds(self, step: str) -> float:
        """The deadline of rung ``step``. A queued task is skipped when a worker reaches it in
        the queue: that deadline bounds the queue, not tasksignal."""
        return {
            SKIPPED: self.skip,
            COOPERATIVE: self.cooperative,
            INTERRUPTED: self.cancel_grace + self.slack,
            KILLED: self.kill_after + self.slack,
        }[step]

    @classmethod
    def during_faults(cls, seconds: float) -> Deadlines:
        """Every rung gets ``seconds``: a stop may have to wait for a server to come back, or
        for a killed node's replacement (the fault mode reports how long each took).

        >>> Deadlines.during_faults(90).seconds(COOPERATIVE)
        90
        """
        return cls(cancel_grace=0, kill_after=0, cooperative=seconds, slack=seconds, skip=seconds)

    def longest(self, step: str) -> float:
        """The longest a cancel of a task whose shape needs ``step`` may take."""
        return max(self.seconds(step), self.seconds(SKIPPED))


def judge_cancel(
    step: str, answer: dict[str, Any], deadlines: Deadlines, *, any_step: bool = False
) -> tuple[bool, str]:
    """Judge the answer of a cancel of a task whose shape needs rung ``step``.

    ``answer`` is the API's signal (``POST .../cancel/?wait=``) or task document. With
    ``any_step`` (servers fail during the run) any rung of the ladder honours the cancel: a
    task whose node was killed was stopped by that, and its cancel is completed ``killed``.

    >>> d = Deadlines()
    >>> judge_cancel(INTERRUPTED, {"completed": True, "outcome": "interrupted",
    ...                            "latency_ms": 1012}, d)
    (True, 'interrupted in 1012 ms')
    >>> judge_cancel(INTERRUPTED, {"completed": True, "outcome": "killed",
    ...                            "latency_ms": 3200}, d)[1]
    'escalated to killed, expected interrupted or skipped'
    >>> judge_cancel(COOPERATIVE, {"completed": True, "outcome": "too_late"}, d)[1]
    'outcome too_late, expected cooperative or skipped'
    >>> judge_cancel(COOPERATIVE, {"completed": False, "outcome": None}, d)[1]
    'not stopped by its deadline'
    >>> judge_cancel(COOPERATIVE, {"completed": True, "outcome": "killed", "latency_ms": 9000},
    ...              Deadlines.during_faults(90), any_step=True)
    (True, 'killed in 9000 ms')
    """
    outcome = answer.get("outcome")
    if answer.get("state") in FAILED_STATES:
        return False, f"ended {answer['state']} despite the cancel (outcome {outcome})"
    if not answer.get("completed", outcome is not None) or outcome is None:
        return False, "not stopped by its deadline"
    allowed = LADDER if any_step else (step, SKIPPED)
    if outcome not in allowed:
        later = outcome in LADDER and LADDER.index(outcome) > LADDER.index(step)
        expected = " or ".join(allowed)
        return False, f"{'escalated to' if later else 'outcome'} {outcome}, expected {expected}"
    latency = answer.get("latency_ms")
    if latency is None:
        return False, f"{outcome} but the API gives no latency_ms"
    limit_ms = deadlines.seconds(outcome) * 1000
    if latency > limit_ms:
        return False, f"{outcome} only after {latency:.0f} ms (deadline {limit_ms:.0f} ms)"
    return True, f"{outcome} in {latency:.0f} ms"


def judge_sibling(expected: int, answer: dict[str, Any]) -> tuple[bool, str]:
    """Judge a sibling task from its task document (``GET ...?wait=``).

    >>> judge_sibling(21, {"finished": True, "state": "SUCCESS", "result": 21})
    (True, 'returned 21')
    >>> judge_sibling(21, {"finished": True, "state": "FAILURE", "result": None})
    (False, 'ended FAILURE: None')
    >>> judge_sibling(21, {"finished": False, "state": "PENDING"})
    (False, 'no result by its deadline (state PENDING)')
    """
    state = answer.get("state")
    if state == "SUCCESS":
        result = answer.get("result")
        if result == expected:
            return True, f"returned {result}"
        return False, f"returned {result!r}, expected {expected}"
    if answer.get("finished"):
        return False, f"ended {state}: {answer.get('result')!r}"
    return False, f"no result by its deadline (state {state})"


def judge_workflow(
    jobs: list[dict[str, Any]],
    callback: dict[str, Any],
    deadlines: Deadlines,
    *,
    any_step: bool = False,
) -> tuple[bool, str]:
    """Judge a workflow cancelled with ``?cascade=true`` from its tasks' documents: every
    cooperative job stopped like a cancelled one (:func:`judge_cancel`), and the callback
    ended ``REVOKED`` without ever starting.

    >>> job = {"state": "REVOKED", "outcome": "cooperative", "latency_ms": 40}
    >>> never_ran = {"state": "REVOKED", "started_at": None}
    >>> judge_workflow([job, {**job, "outcome": "skipped"}], never_ran, Deadlines())
    (True, '2 jobs stopped (cooperative, skipped), callback never ran')
    >>> judge_workflow([job, {"state": "SUCCESS", "outcome": None}], never_ran, Deadlines())[1]
    'job 2 of 2: ended SUCCESS despite the cancel (outcome None) (state SUCCESS, run None, None)'
    >>> judge_workflow([job], {"state": "SUCCESS", "started_at": "12:00"}, Deadlines())[1]
    'the callback ran (state SUCCESS)'
    """
    for number, job in enumerate(jobs, 1):
        ok, reason = judge_cancel(COOPERATIVE, job, deadlines, any_step=any_step)
        if not ok:
            seen = f"state {job.get('state')}, run {job.get('run_state')}, {job.get('signals')}"
            return False, f"job {number} of {len(jobs)}: {reason} ({seen})"
    if callback.get("started_at") or callback.get("state") != "REVOKED":
        return False, f"the callback ran (state {callback.get('state')})"
    outcomes = ", ".join(sorted({job["outcome"] for job in jobs}))
    return True, f"{len(jobs)} jobs stopped ({outcomes}), callback never ran"


def gate(counts: dict[str, int], outcomes: dict[str, dict], max_p99_ms: float) -> list[str]:
    """Reasons the storm fails, each a sentence; empty when it passes.

    >>> gate({"honoured": 9, "unhonoured": 0, "siblings_failed": 0},
    ...      {"cooperative": {"p99_ms": 40}}, 100)
    []
    >>> gate({"honoured": 9, "unhonoured": 2, "siblings_failed": 1},
    ...      {"cooperative": {"p99_ms": 140}}, 100)  # doctest: +NORMALIZE_WHITESPACE
    ['2 cancels not honoured', '1 sibling tasks harmed (collateral)',
     'cooperative p99 140 ms > 100 ms']
    """
    reasons = []
    if counts["unhonoured"]:
        reasons.append(f"{counts['unhonoured']} cancels not honoured")
    if counts["siblings_failed"]:
        reasons.append(f"{counts['siblings_failed']} sibling tasks harmed (collateral)")
    if not counts["honoured"]:
        reasons.append("no cancel was honoured at all")
    cooperative = outcomes.get(COOPERATIVE)
    if cooperative is not None and cooperative["p99_ms"] > max_p99_ms:
        reasons.append(f"cooperative p99 {cooperative['p99_ms']:.0f} ms > {max_p99_ms:.0f} ms")
    return reasons


def share_running(outcomes: dict[str, dict]) -> float | None:
    """The share of honoured cancels that stopped a task already running (not a skip).

    >>> share_running({"cooperative": {"count": 8}, "skipped": {"count": 2}})
    0.8
    """
    total = sum(row["count"] for row in outcomes.values())
    if not total:
        return None
    running = sum(outcomes[step]["count"] for step in RUNNING_STOPS if step in outcomes)
    return round(running / total, 3)
