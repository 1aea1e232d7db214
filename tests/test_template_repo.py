"""The template repository's own tooling: CI entry points, lint, the service check, the matrix."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import tool
from template_options import CHOICE_OPTIONS, REPO_ROOT, case_id, pairwise_cases, uncovered_pairs


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **env},
    )


def test_pairwise_cases_cover_every_pair_of_answers() -> None:
    missing = uncovered_pairs(pairwise_cases())
    assert not missing, f"pairs no bake covers: {missing}"


def test_pairwise_cases_are_fewer_than_all_combinations() -> None:
    total = 1
    for values in CHOICE_OPTIONS.values():
        total *= len(values)
    assert len(pairwise_cases()) < total / 10, "the pairwise cover is not much of a saving"


def test_bake_ids_are_unique_and_readable() -> None:
    ids = [case_id(case) for case in pairwise_cases()]
    assert len(set(ids)) == len(ids), f"duplicate bake ids: {sorted(ids)}"
    assert all(" " not in test_id for test_id in ids), "bake ids contain spaces"


def test_ci_entry_point_runs_make_test_and_nothing_else() -> None:
    script = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[0] == "set -euo pipefail", f".ci/run must fail fast; starts with {commands[0]}"
    assert commands[-1] == "exec make test", f".ci/run must end in `exec make test`: {commands}"
    assert script.startswith("#!/usr/bin/env bash\n"), ".ci/run needs a bash shebang"


def test_template_ci_workflow_matches_the_workflow_schema() -> None:
    result = _run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            ".github/workflows/template-ci.yml",
        ]
    )
    exit_code = result.returncode
    assert exit_code == 0, f"template-ci.yml is invalid:\n{result.stdout}{result.stderr}"


def test_template_code_passes_ruff_check() -> None:
    result = _run([tool("ruff"), "check", "--no-cache", "hooks", "tests", "scripts"])
    exit_code = result.returncode
    assert exit_code == 0, f"ruff check:\n{result.stdout}{result.stderr}"


def test_template_code_is_ruff_formatted() -> None:
    result = _run([tool("ruff"), "format", "--check", "--no-cache", "hooks", "tests", "scripts"])
    exit_code = result.returncode
    assert exit_code == 0, f"ruff format --check:\n{result.stdout}{result.stderr}"


def test_service_check_passes_when_both_services_answer() -> None:
    result = _run([sys.executable, "scripts/check_services.py"])
    exit_code = result.returncode
    assert exit_code == 0, f"services reported down:\n{result.stdout}{result.stderr}"
    assert "ok: PostgreSQL" in result.stdout
    assert "ok: Redis" in result.stdout


def test_service_check_says_how_to_start_what_is_down() -> None:
    result = _run(
        [sys.executable, "scripts/check_services.py"],
        DATABASE_URL="postgres://postgres@127.0.0.1:9/postgres",
        REDIS_URL="redis://127.0.0.1:9/0",
    )
    exit_code = result.returncode
    assert exit_code == 2, f"expected exit 2 with both services down, got {result.returncode}"
    advice = result.stderr
    for command in (
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        "apt-get install postgresql",
        "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379",
        "apt-get install redis-server",
    ):
        assert command in advice, f"the advice lacks `{command}`:\n{advice}"


def test_service_check_hides_passwords() -> None:
    result = _run(
        [sys.executable, "scripts/check_services.py"],
        DATABASE_URL="postgres://postgres:topsecret@127.0.0.1:9/postgres",
    )
    assert "topsecret" not in result.stdout + result.stderr, "a password was printed"
