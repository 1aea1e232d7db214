"""End to end, briefly, on the Python that the full end-to-end runs leave out: 3.13.

``test_e2e.py`` runs the baked project's whole suite on Django 6.1 with Python 3.12 (the
defaults) and Django 5.2 with Python 3.11. This bake takes the newest pair, Django 6.1 on
Python 3.13, installs it from its lock file like the others (exactly ``requirements-dev.txt``,
hashes checked, ``uv pip check``), and then proves the parts that depend on the interpreter:
Django's system check, every migration applied with the production settings, and real
prefork workers running tasks (the project's own ``tests/test_worker.py`` and the signal
ladder of ``tests/test_cancel_ladder.py``). About a minute, against four for a full suite.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from baked import (
    create_venv,
    find_python,
    forget_namespace,
    isolation_values,
    production_values,
    project_env,
    run,
    scratch_database,
    unique_name,
)
from conftest import Bake

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

SMOKE_ANSWERS = {
    "django_version": "6.1",
    "python_version": "3.13",
    "postgres_version": "15",
    "use_celery_beat": "n",
    "open_source_license": "Apache-2.0",
}
#: The project's own tests that start real prefork workers.
WORKER_TESTS = ("tests/test_worker.py", "tests/test_cancel_ladder.py")


@dataclass(frozen=True)
class Smoke:
    """The bake, installed."""

    path: Path
    bin_dir: Path

    @property
    def python(self) -> str:
        """The virtualenv's interpreter."""
        return str(self.bin_dir / "python")


@pytest.fixture(scope="module")
def smoke(
    bake: Callable[[Mapping[str, str]], Bake], tmp_path_factory: pytest.TempPathFactory
) -> Smoke:
    """The smoke bake, copied out of the cache and installed from its lock file."""
    python = find_python(SMOKE_ANSWERS["python_version"])
    if python is None:
        pytest.skip(f"no Python {SMOKE_ANSWERS['python_version']} on this machine (pyenv?)")
    baked = bake(SMOKE_ANSWERS)
    project = tmp_path_factory.mktemp("e2e-smoke") / baked.project.name
    shutil.copytree(baked.project, project, symlinks=True)
    try:
        bin_dir = create_venv(project, python)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"installing from the lock file failed:\n{error.stdout}\n{error.stderr}")
    return Smoke(project, bin_dir)


@pytest.fixture
def isolated() -> Iterator[dict[str, str]]:
    """A database and a Celery queue of this test's own."""
    namespace = unique_name("tssmoke")
    with scratch_database("tssmoke") as database:
        yield isolation_values(database=database, namespace=namespace)
    forget_namespace(namespace)


def _tail(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    return "\n".join(result.stdout.splitlines()[-lines:])


def test_interpreter_and_django_are_the_chosen_ones(smoke: Smoke) -> None:
    result = run(
        [smoke.python, "-c", "import sys, django; print(sys.version_info[:2], django.VERSION[:2])"],
        cwd=smoke.path,
        env=project_env(smoke.bin_dir),
    )
    assert result.stdout.strip() == "(3, 13) (6, 1)", _tail(result)


def test_system_check_and_migrations_with_production_settings(
    smoke: Smoke, isolated: dict[str, str]
) -> None:
    check = run(
        [smoke.python, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=smoke.path,
        env=project_env(smoke.bin_dir, **isolated),
    )
    assert check.returncode == 0, f"manage.py check failed:\n{_tail(check)}"
    production = production_values(
        database=isolated["DATABASE_URL"], namespace=isolated["CELERY_TASK_DEFAULT_QUEUE"]
    )
    dotenv, hidden = smoke.path / ".env", smoke.path.parent / "hidden.env"
    dotenv.rename(hidden)  # a deployment has no .env
    try:
        migrate = run(["bin/migrate"], cwd=smoke.path, env=project_env(smoke.bin_dir, **production))
    finally:
        hidden.rename(dotenv)
    assert migrate.returncode == 0, f"bin/migrate failed:\n{_tail(migrate)}"


@pytest.mark.timeout(600)
def test_real_prefork_workers_run_and_stop_tasks(smoke: Smoke, isolated: dict[str, str]) -> None:
    result = run(
        [smoke.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *WORKER_TESTS],
        cwd=smoke.path,
        env=project_env(smoke.bin_dir, **isolated),
        timeout=540,
    )
    exit_code = result.returncode
    assert exit_code == 0, f"the worker tests failed on Python 3.13:\n{_tail(result, 100)}"
