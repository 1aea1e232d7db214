"""The cancel storm of a baked project: every cancel honoured, no collateral damage, under load.

Bakes the defaults, installs them into a fresh virtualenv and runs the project's own
``make loadtest`` (``loadtest/run.py``) in ``cancel`` mode for at least 30 s and 500 cancels
(longer only on a machine too busy for that): gunicorn and a prefork worker of 64 processes,
76 Locust users each keeping a long task in flight and cancelling it through the JSON API
(start, cancel with ``?wait=``: two requests a flow), 8 users whose tasks must come back
intact. The test then reads the run's JSON summary and fails, saying what went wrong, on any
cancel that did not stop its task by the right ladder step in time, on any sibling task
harmed, on a storm that cancelled mostly queued tasks and on one that polled.

Figures that depend on the machine (cancels per second, latency percentiles) are printed and
recorded as properties, not asserted: the storm's own gate on the cooperative p99 is relaxed
here (``LOADTEST_MAX_P99_MS``) because the template's tests share two CPUs with everything else.
The revoke baseline is left to ``make loadtest`` itself.

The same project then runs ``make chaos`` for 60 s: the storm while its worker node is killed
and frozen and its own Redis and PostgreSQL restart; it fails on any cancel never honoured,
any sibling lost or wrong, any 5xx but 503, anything left pending, or a stack that needed help.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from baked import create_venv, find_python, project_env, redis_url, scratch_database
from conftest import Bake

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

#: What the storm must reach for the run to count as a storm at all.
MIN_RUN_SECONDS = 30
MIN_TASKS_IN_FLIGHT = 64
MIN_CANCELS = 500
#: Half the tasks in flight running at once at some moment: the storm cancels running tasks.
MIN_RUNNING_AT_ONCE = MIN_TASKS_IN_FLIGHT // 2
#: Start, cancel (answered when the task stopped), and now and then a retry.
MAX_REQUESTS_PER_FLOW = 3

STORM_SETTINGS = {
    "LOADTEST_DURATION": f"{MIN_RUN_SECONDS}s",
    "LOADTEST_MODES": "cancel",
    # Each user has a moment between two flows with nothing in flight: a few more users than
    # the minimum keep at least 64 tasks in flight at once.
    "LOADTEST_USERS": str(MIN_TASKS_IN_FLIGHT + 12),
    "LOADTEST_SIBLING_USERS": "8",
    # The worker node holds one PostgreSQL connection however many processes it runs.
    "LOADTEST_WORKER_CONCURRENCY": str(MIN_TASKS_IN_FLIGHT),
    # This test proves every cancel is honoured and nothing else harmed; latency is the
    # benchmarks' business (make loadtest gates it at 100 ms on a dedicated machine).
    "LOADTEST_MAX_P99_MS": "5000",
    # At least 30 s and at least 500 cancels: on a busy machine the run goes on, up to 150 s.
    "LOADTEST_MIN_CANCELS": str(MIN_CANCELS),
    "LOADTEST_MAX_DURATION": "150s",
    # Flows still running when the 30 s end get this long to finish.
    "LOADTEST_STOP_TIMEOUT": "12",
}


@pytest.fixture(scope="module")
def storm_project(
    bake: Callable[[Mapping[str, str]], Bake], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The default bake, copied out of the cache and installed; returns (project, bin dir)."""
    baked = bake({})
    project = tmp_path_factory.mktemp("storm") / baked.project.name
    shutil.copytree(baked.project, project, symlinks=True)
    version = baked.answers["python_version"]
    python = find_python(version)
    if python is None:
        warnings.warn(f"no Python {version} here; installing with the running one", stacklevel=1)
        python = sys.executable
    try:
        bin_dir = create_venv(project, python)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"installing the baked project failed:\n{error.stdout}\n{error.stderr}")
    return project, bin_dir


@pytest.fixture
def storm_database() -> Iterator[str]:
    """A database of the storm's own, dropped afterwards."""
    with scratch_database("tsstorm") as url:
        yield url


def _run_storm(project: Path, bin_dir: Path, database: str) -> subprocess.CompletedProcess[str]:
    environment = project_env(
        bin_dir, DATABASE_URL=database, REDIS_URL=redis_url(), **STORM_SETTINGS
    )
    # The project's Makefile includes loadtest.mk; calling the file itself keeps this test
    # independent of the rest of the Makefile.
    return subprocess.run(
        ["make", "--no-print-directory", "-f", "loadtest/loadtest.mk", "loadtest"],
        cwd=project,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _failures(summary: dict[str, Any], word: str) -> str:
    rows = [row for row in summary["failures"] if word in row["kind"]]
    return "\n".join(f"  {row['count']} x {row['example']}" for row in rows) or "  (none listed)"


def _figures(storm: dict[str, Any]) -> str:
    counts = storm["counts"]
    lines = [
        f"{counts['honoured']} cancels honoured in {storm['elapsed_s']} s "
        f"({storm['honoured_per_s']}/s), {counts['unhonoured']} not, {counts['cutoff']} cut off; "
        f"siblings {counts['siblings_ok']} ok, {counts['siblings_failed']} harmed; "
        f"tasks in flight mean {storm['tasks_in_flight']['mean']}, "
        f"max {storm['tasks_in_flight']['max']}; running mean {storm['running']['mean']}, "
        f"max {storm['running']['max']}; {storm['http_per_s']} HTTP requests/s, "
        f"{storm['requests_per_flow']} per flow; CPU {storm['cpu_ms_per_stop']} ms per stop",
    ]
    lines += [
        f"  {name}: n={row['count']} p50 {row['p50_ms']:.0f} ms p95 {row['p95_ms']:.0f} ms "
        f"p99 {row['p99_ms']:.0f} ms max {row['max_ms']:.0f} ms"
        for name, row in storm["outcomes"].items()
    ]
    return "\n".join(lines)


@pytest.mark.timeout(900)
def test_cancel_storm_honours_every_cancel_without_collateral(
    storm_project: tuple[Path, Path],
    storm_database: str,
    record_property: Callable[[str, object], None],
) -> None:
    project, bin_dir = storm_project
    result = _run_storm(project, bin_dir, storm_database)
    output = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
    summary_path = project / "loadtest" / "reports" / "summary.json"
    assert summary_path.exists(), (
        f"make loadtest wrote no summary (exit {result.returncode}):\n{output}"
    )
    storm = json.loads(summary_path.read_text(encoding="utf-8"))["tasksignal"]
    assert storm is not None, f"the storm wrote no summary of its own:\n{output}"
    figures = _figures(storm)
    print(f"\ncancel storm: {figures}")
    record_property("cancel_storm", json.dumps(storm["counts"] | {"outcomes": storm["outcomes"]}))
    counts = storm["counts"]

    assert counts["unhonoured"] == 0, (
        f"{counts['unhonoured']} cancels did not stop their task by the expected ladder step "
        f"within its deadline:\n{_failures(storm, 'unhonoured')}\n{figures}"
    )
    assert counts["siblings_failed"] == 0, (
        f"{counts['siblings_failed']} tasks nobody cancelled were harmed by the storm:\n"
        f"{_failures(storm, 'collateral')}\n{figures}"
    )
    assert counts["siblings_ok"] > 0, f"no sibling task completed, so none was checked\n{figures}"
    assert counts["workflows"] > 0, f"no workflow was cancelled whole (?cascade=true)\n{figures}"
    assert storm["elapsed_s"] >= MIN_RUN_SECONDS, f"the storm ran only {storm['elapsed_s']} s"
    assert storm["tasks_in_flight"]["max"] >= MIN_TASKS_IN_FLIGHT, (
        f"at most {storm['tasks_in_flight']['max']} tasks were in flight at once, "
        f"not {MIN_TASKS_IN_FLIGHT}\n{figures}"
    )
    assert storm["running"]["max"] >= MIN_RUNNING_AT_ONCE, (
        f"at most {storm['running']['max']} tasks were running at once, not "
        f"{MIN_RUNNING_AT_ONCE}: the storm cancelled queued tasks\n{figures}"
    )
    assert storm["requests_per_flow"] <= MAX_REQUESTS_PER_FLOW, (
        f"{storm['requests_per_flow']} HTTP requests per flow, more than "
        f"{MAX_REQUESTS_PER_FLOW}: the storm polls instead of waiting\n{figures}"
    )
    assert counts["cancelled"] >= MIN_CANCELS, (
        f"only {counts['cancelled']} cancels in {storm['elapsed_s']} s (the cap), not "
        f"{MIN_CANCELS}: the machine may be overloaded\n{figures}"
    )
    assert result.returncode == 0, (
        f"make loadtest exited {result.returncode} although every cancel was honoured "
        f"(failed requests?):\n{_failures(storm, '')}\n{output}"
    )


#: The fault run: at least 60 s of storm, every fault (node killed, node frozen, Redis and
#: PostgreSQL restarted) once, on servers of the run's own (loadtest/faults.py).
FAULT_SETTINGS = {"CHAOS_DURATION": "60s", "CHAOS_SETTLE": "90", "CHAOS_MODES": "cancel"}
FAULT_KINDS = {"node-kill", "node-freeze", "redis-restart", "postgres-restart"}


def _run_fault_storm(project: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-f", "loadtest/loadtest.mk", "chaos"],
        cwd=project,
        env=project_env(bin_dir, **FAULT_SETTINGS),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.timeout(900)
def test_fault_storm_loses_nothing_while_the_node_redis_and_postgresql_fail(
    storm_project: tuple[Path, Path], record_property: Callable[[str, object], None]
) -> None:
    project, bin_dir = storm_project
    result = _run_fault_storm(project, bin_dir)
    output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    summary_path = project / "loadtest" / "reports" / "faults-summary.json"
    assert summary_path.exists(), (
        f"make chaos wrote no summary (exit {result.returncode}):\n{output}"
    )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    record_property(
        "fault_storm", json.dumps({"faults": summary["faults"], "audit": summary["audit"]})
    )
    print(f"\nfault storm:\n{output}")
    assert set(summary["faults"]) == FAULT_KINDS, f"faults injected: {sorted(summary['faults'])}"
    counts = summary["storm"]["counts"]
    assert counts["unhonoured"] == 0, f"{counts['unhonoured']} cancels never honoured:\n{output}"
    assert counts["siblings_failed"] == 0, (
        f"{counts['siblings_failed']} siblings lost or wrong:\n{output}"
    )
    assert counts["http_failures"] == 0, (
        f"{counts['http_failures']} answers 5xx other than 503:\n{output}"
    )
    lost = {kind: row["lost"] for kind, row in summary["faults"].items() if row["lost"]}
    assert not lost, f"flows lost per fault: {lost}\n{output}"
    audit = {key: value for key, value in summary["audit"].items() if key != "left_behind"}
    left_behind = summary["audit"].get("left_behind")
    assert audit.get("signals_pending") == 0, f"signals never completed: {audit}\n{left_behind}"
    assert audit.get("runs_left_live") == 0, f"runs left unfinished: {audit}\n{left_behind}"
    assert not summary["restarts"], f"the stack did not recover by itself: {summary['restarts']}"
    assert result.returncode == 0, f"make chaos failed: {summary['failures']}\n{output}"
