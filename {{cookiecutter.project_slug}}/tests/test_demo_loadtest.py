"""The load test: its judging, as plain functions (what honours a cancel, what counts as a
peak, what fails a fault run: their examples are their docstrings; this runs them), and a
short storm end to end, as ``make loadtest`` runs it."""

import doctest
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import database_url

LOADTEST = Path(__file__).resolve().parent.parent / "loadtest"


@pytest.fixture(scope="module", autouse=True)
def loadtest_on_path():
    """The load test's modules import each other as top-level modules, as Locust runs them."""
    sys.path.insert(0, str(LOADTEST))
    yield
    sys.path.remove(str(LOADTEST))


@pytest.mark.parametrize("name", ["verdict", "run", "faults"])
def test_the_examples_in_each_load_test_module_hold(name):
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"loadtest/{name}.py has no examples to check"
    assert failed == 0, f"{failed} of {attempted} examples in loadtest/{name}.py are wrong"


def test_a_short_storm_passes_end_to_end(transactional_db, tmp_path):
    """``loadtest/run.py`` with a few users for a few seconds: its own database, web and
    worker, every cancel honoured, no sibling harmed, everything stopped (figures mean
    nothing at this size; ``make loadtest`` is the real run). Its database is made beside
    the test database, on the same server."""
    storm = {
        "DATABASE_URL": database_url(),
        "LOADTEST_DURATION": "8s",
        "LOADTEST_MODES": "cancel",
        "LOADTEST_USERS": "4",
        "LOADTEST_SIBLING_USERS": "1",
        "LOADTEST_WORKER_CONCURRENCY": "6",
        "LOADTEST_WORKFLOW_SHARE": "0.3",  # a few whole workflows among the flows
        "LOADTEST_WEB_CONCURRENCY": "1",
        "LOADTEST_MAX_P99_MS": "10000",  # a smoke test on a shared machine: no latency gate
        "LOADTEST_REPORT_DIR": str(tmp_path),
    }
    # Production settings, as make loadtest runs it (run.py's default), not the tests' own.
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    ran = subprocess.run(
        [sys.executable, str(LOADTEST / "run.py")],
        cwd=LOADTEST.parent,
        env=env | storm,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = "\n".join((ran.stdout + ran.stderr).splitlines()[-40:])
    assert ran.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["tasksignal"]
    counts = summary["counts"]
    assert counts["honoured"] > 0, output
    assert counts["unhonoured"] == counts["siblings_failed"] == 0, output
    assert counts["workflows"] > 0, f"no workflow was cancelled whole: {counts}"
    assert counts["workflows_honoured"] == counts["workflows"], output
