"""The generated project's benchmarks run end to end and write the JSON they promise.

The default bake is copied out of the session's bake cache and its benchmarks run once with
``python -m benchmarks --quick`` (tiny sizes, real prefork workers) against a database of
their own. The tests then read the JSON files: every benchmark wrote one, with the agreed
keys, an environment, targets with a verdict, and figures that are numbers of the right
sign; ``python -m benchmarks.report`` turns them into Markdown. No figure is compared with
a threshold: a quick run on a shared machine says nothing about speed, only that the
benchmarks work.

The project's dependencies come from the running interpreter when it already has them (a
developer's virtualenv); otherwise the copy is installed into its own virtualenv with uv,
as the end-to-end tests do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from baked import create_venv, find_python, project_env, redis_url, run, scratch_database
from conftest import Bake

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

BENCHMARKS = ("checkpoint", "throughput", "cancel_latency", "cascade")
#: Modules the generated project needs at run time (its ``dependencies``), by import name.
PROJECT_IMPORTS = ("django", "celery", "environ", "whitenoise", "psycopg", "redis", "psutil")
TOP_LEVEL_KEYS = {
    "benchmark",
    "description",
    "quick",
    "parameters",
    "environment",
    "results",
    "targets",
    "passed",
    "notes",
    "worker_log",
    "duration_s",
}
ENVIRONMENT_KEYS = {"date", "cpu_count", "python", "celery", "django", "load_average"}
TARGET_KEYS = {"name", "value", "op", "limit", "unit", "passed"}


@dataclass(frozen=True)
class QuickRun:
    """One ``python -m benchmarks --quick`` of a baked project: its output, JSON and report."""

    completed: subprocess.CompletedProcess[str]
    results: dict[str, dict]
    report: subprocess.CompletedProcess[str]

    def output(self, lines: int = 80) -> str:
        """The end of what the run printed, for failure messages."""
        return "\n".join(self.completed.stdout.splitlines()[-lines:])


def _python_with_project_dependencies(project: Path, version: str) -> Path:
    """Return the running interpreter if it can import the project's dependencies, else a venv.

    The venv gets the bake's Python ``version``: its lock file is made for what it supports.
    """
    probe = subprocess.run(
        [sys.executable, "-c", f"import {', '.join(PROJECT_IMPORTS)}"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if probe.returncode == 0:
        return Path(sys.executable)
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine for the default bake")
    try:
        return create_venv(project, python, extras="") / "python"
    except subprocess.CalledProcessError as error:
        pytest.fail(f"installing the baked project failed:\n{error.stdout}\n{error.stderr}")


@pytest.fixture(scope="module")
def quick_run(
    bake: Callable[[Mapping[str, str]], Bake], tmp_path_factory: pytest.TempPathFactory
) -> QuickRun:
    """Bake the defaults, migrate a scratch database and run every benchmark quickly."""
    workspace = tmp_path_factory.mktemp("benchmarks")
    project = workspace / bake({}).project.name
    shutil.copytree(bake({}).project, project, symlinks=True)
    python = _python_with_project_dependencies(project, bake({}).answers["python_version"])
    output_dir = workspace / "results"
    with scratch_database("tsbench") as database:
        broker = redis_url()
        env = project_env(
            python.parent,
            DATABASE_URL=database,
            REDIS_URL=broker,
            CELERY_BROKER_URL=broker,
            CELERY_RESULT_BACKEND=broker,
            DJANGO_SETTINGS_MODULE="config.settings.local",
        )
        migrate = run([str(python), "manage.py", "migrate", "--noinput"], cwd=project, env=env)
        assert migrate.returncode == 0, f"migrate failed:\n{migrate.stdout}"
        completed = run(
            [str(python), "-m", "benchmarks", "--quick", "--output-dir", str(output_dir)],
            cwd=project,
            env=env,
            timeout=600,
        )
    results = {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in output_dir.glob("*.json")
    }
    report = run(
        [str(python), "-m", "benchmarks.report", "--output-dir", str(output_dir)],
        cwd=project,
        env=env,
    )
    return QuickRun(completed=completed, results=results, report=report)


def test_quick_run_exits_zero(quick_run: QuickRun) -> None:
    assert quick_run.completed.returncode == 0, quick_run.output()


def test_quick_run_prints_a_verdict_per_benchmark(quick_run: QuickRun) -> None:
    summary = quick_run.completed.stdout.rpartition("== summary")[2]
    for name in BENCHMARKS:
        assert f"PASS  {name}" in summary or f"FAIL  {name}" in summary, quick_run.output()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_writes_its_json(quick_run: QuickRun, name: str) -> None:
    assert name in quick_run.results, f"no {name}.json:\n{quick_run.output()}"
    result = quick_run.results[name]
    assert set(result) >= TOP_LEVEL_KEYS
    assert result["benchmark"] == name
    assert result["quick"] is True
    assert set(result["environment"]) >= ENVIRONMENT_KEYS
    assert result["environment"]["cpu_count"] >= 1
    assert result["targets"], "a benchmark without a target"
    for check in result["targets"]:
        assert set(check) >= TARGET_KEYS
        assert isinstance(check["passed"], bool)
    assert result["passed"] == all(check["passed"] for check in result["targets"])
    assert result["duration_s"] > 0


def test_checkpoint_figures_are_sane(quick_run: QuickRun) -> None:
    results = quick_run.results["checkpoint"]["results"]
    assert results["measured_in_running_task"] is True
    assert results["checkpoint_ns"] > 0
    assert results["is_aborted_ns"] > 0
    assert results["ratio_is_aborted_over_checkpoint"] > 0
    parameters = quick_run.results["checkpoint"]["parameters"]
    assert results["checkpoint_ns_per_call"]["n"] == parameters["rounds"] * parameters["batches"]


def test_throughput_figures_are_sane(quick_run: QuickRun) -> None:
    results = quick_run.results["throughput"]["results"]
    for kind in ("signal_aware", "plain"):
        assert results["tasks_per_second"][kind]["p50"] > 0
        assert results["worker_runtime_us"][kind]["n"] > 0
        assert results["records_off"]["tasks_per_second"][kind]["p50"] > 0
    assert results["ratio_of_medians"] > 0
    records = results["run_records"]
    assert records["enabled"] is True, "run records are on by default"
    assert 0 <= records["written"] <= records["expected"]


def test_cancel_latency_figures_are_sane(quick_run: QuickRun) -> None:
    result = quick_run.results["cancel_latency"]
    for step in ("cooperative", "interrupted", "killed"):
        figures = result["results"]["ladder"][step]
        assert figures["trials"] == result["parameters"][step]
        assert sum(figures["outcomes"].values()) == figures["trials"]
        latency = figures["latency_ms"]
        if latency["n"]:
            assert 0 < latency["min"] <= latency["p50"] <= latency["p99"] <= latency["max"]
    for case, figures in result["results"]["revoke_terminate"].items():
        assert figures["trials"] >= 1, case
        assert 0 <= figures["stopped"] <= figures["trials"]


def test_cascade_figures_are_sane(quick_run: QuickRun) -> None:
    result = quick_run.results["cascade"]
    chord, wide = result["results"]["chord"], result["results"]["wide"]
    assert chord["trials"] == result["parameters"]["chord_trials"]
    assert 0 <= chord["all_stopped_body_never_ran"] <= chord["trials"]
    assert wide["reached"] == result["parameters"]["wide_tasks"] + 1, "the root and each task"
    assert wide["statements"] >= 3, "fewer statements than a cascade needs: none measured?"


def test_report_prints_markdown_of_every_result(quick_run: QuickRun) -> None:
    assert quick_run.report.returncode == 0, quick_run.report.stdout
    for title in ("Checkpoint cost", "Throughput", "Cancel latency", "Cascade"):
        assert f"#### {title}" in quick_run.report.stdout, quick_run.report.stdout
