"""The benchmarks work: ``python -m benchmarks --quick`` (tiny sizes, real prefork workers,
on the test database) runs every benchmark of ``benchmarks/``, each writes the result it
promises, and the report renders every result.

No figure is compared with a target: a quick run on a shared machine says nothing about
speed, only that the benchmarks run. A new benchmark is found and checked here without any
change to this file.
"""

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common
from tests.conftest import database_url

PROJECT_DIR = Path(__file__).resolve().parent.parent
#: What every result has, whatever the benchmark (``common.result_payload``).
RESULT_KEYS = {"benchmark", "description", "quick", "parameters", "environment", "results",
               "targets", "passed", "notes", "worker_log", "duration_s"}  # fmt: skip
TARGET_KEYS = {"name", "value", "op", "limit", "unit", "passed"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": database_url()},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.django_db(transaction=True)
def test_every_benchmark_runs_quickly_and_the_report_renders_it(tmp_path):
    ran = _run("benchmarks", "--quick", "--output-dir", str(tmp_path))
    output = "\n".join((ran.stdout + ran.stderr).splitlines()[-60:])
    assert ran.returncode == 0, output
    names = sorted(common.discover())
    assert {"cancel_latency", "checkpoint", "throughput"} <= set(names), names
    for name in names:
        path = tmp_path / f"{name}.json"
        assert path.is_file(), f"{name} wrote no result:\n{output}"
        result = json.loads(path.read_text(encoding="utf-8"))
        assert set(result) >= RESULT_KEYS, f"{name}: {sorted(RESULT_KEYS - set(result))} missing"
        assert result["benchmark"] == name
        assert result["quick"] is True
        assert result["targets"], f"{name} has no target"
        assert all(set(check) >= TARGET_KEYS for check in result["targets"]), name
        assert result["passed"] == all(check["passed"] for check in result["targets"]), name
    report = _run("benchmarks.report", "--output-dir", str(tmp_path))
    assert report.returncode == 0, report.stderr
    for name in names:
        assert f"#### {name}: " in report.stdout, f"the report left out {name}:\n{report.stdout}"


def test_the_examples_in_the_benchmark_helpers_hold():
    from benchmarks import report, tasks  # tasks: once Django is set up

    for module in (common, report, tasks):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0, f"{module.__name__} has no examples"
        assert failed == 0, f"{failed} of {attempted} examples in {module.__name__} are wrong"
