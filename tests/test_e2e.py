"""End to end: a baked project installs, passes Django's checks and its own tests, and runs.

Two bakes are exercised with the baked project's whole suite: the defaults (Django 6.1 on
Python 3.12), and a slim variant on the other Django and the oldest Python (Django 5.2 LTS on
Python 3.11; no Docker, no beat, Flower and Sentry on, no demo app, no CI, closed source).
``test_e2e_smoke.py`` covers the remaining Python, 3.13, more briefly. Each is copied out of
the session's bake cache, installed into a fresh virtualenv from its lock file (exactly
``requirements-dev.txt``, hashes checked, then ``uv pip check``), and then:

* ``manage.py check`` and ``makemigrations --check`` pass with the developer's ``.env``;
* ``check --deploy --fail-level WARNING`` passes with production settings and realistic values;
* the project's own pytest suite passes against real PostgreSQL and Redis, browser tests included
  (``TASKSIGNAL_REQUIRE_BROWSER=1``: no Chromium is a failure, not a skip);
* ``make lint`` passes: ruff and mypy (django-stubs) on the Django release of the variant, and
  for the defaults the same checks through ``pre-commit run --all-files``;
* the Procfile's processes start as a platform would start them, ``/healthz`` answers 200
  through gunicorn, and SIGTERM to each main process ends it cleanly with no orphan left.

Isolation: every test creates and drops its own database, and every started worker uses its
own Celery queue and task-signal channel, so runs never collide with other users of the shared
PostgreSQL and Redis. The tests of this module never run in parallel with each other.

Developer-side commands run with the ``.env`` the post-generation hook wrote, as a developer
would. Production-side commands run with that file hidden and only an explicit environment,
as in a container or on a platform, where ``.env`` is never deployed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from baked import (
    create_venv,
    find_python,
    forget_namespace,
    isolation_values,
    production_values,
    project_env,
    project_processes,
    run,
    scratch_database,
    unique_name,
)
from conftest import Bake
from template_options import DEFAULT_ANSWERS

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

RUNNING_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

VARIANTS = {
    "default": {},
    "slim": {
        "django_version": "5.2",
        "python_version": "3.11",
        "use_docker": "n",
        "use_celery_beat": "n",
        "use_flower": "y",
        "use_sentry": "y",
        "include_demo_tasks": "n",
        "ci_tool": "none",
        "open_source_license": "Not open source",
    },
}

#: Every answer of each variant, to tell them apart in tests that only some variants run.
VARIANT_ANSWERS = {name: DEFAULT_ANSWERS | answers for name, answers in VARIANTS.items()}

#: Exit codes that mean "stopped cleanly after SIGTERM", per Procfile process type.
#: gunicorn and celery (worker and beat) exit 0 after a graceful/warm shutdown.
GRACEFUL_EXIT_CODES: dict[str, set[int]] = {
    "web": {0},
    "worker": {0},
    "beat": {0},
    "flower": {0},
}

#: Seconds a process may take to stop after SIGTERM (gunicorn's graceful timeout is 20 s).
STOP_TIMEOUT = 30.0


@dataclass
class Installed:
    """A baked project copied to a scratch folder and installed into its own virtualenv."""

    answers: Mapping[str, str]
    path: Path
    bin_dir: Path
    python_version: str

    @property
    def python(self) -> str:
        """The virtualenv's interpreter."""
        return str(self.bin_dir / "python")

    def developer_env(self, database: str, namespace: str) -> dict[str, str]:
        """A developer's environment: the project reads .env; only isolation is set here."""
        return project_env(self.bin_dir, **isolation_values(database=database, namespace=namespace))

    @contextmanager
    def without_dotenv(self) -> Iterator[None]:
        """Hide the project's .env for the duration of the block, as a deployment lacks it."""
        dotenv, hidden = self.path / ".env", self.path.parent / "hidden.env"
        dotenv.rename(hidden)
        try:
            yield
        finally:
            hidden.rename(dotenv)

    @property
    def processes(self) -> ModuleType:
        """The project's own process runner (``tasksignal/processes.py``)."""
        return project_processes(self.path)

    def procfile(self) -> dict[str, str]:
        """The Procfile's process types and commands."""
        return self.processes.procfile_commands(self.path / "Procfile")


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def installed(
    request: pytest.FixtureRequest,
    bake: Callable[[Mapping[str, str]], Bake],
    tmp_path_factory: pytest.TempPathFactory,
) -> Installed:
    """A bake of one variant, copied out of the cache and installed with uv."""
    baked = bake(VARIANTS[request.param])
    workspace = tmp_path_factory.mktemp(f"e2e-{request.param}")
    project = workspace / baked.project.name
    shutil.copytree(baked.project, project, symlinks=True)

    version = baked.answers["python_version"]
    python = find_python(version)
    if python is None:
        warnings.warn(
            f"no Python {version} on this machine; installing with {RUNNING_PYTHON} instead",
            stacklevel=1,
        )
        python = sys.executable
    try:
        bin_dir = create_venv(project, python)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"installing the baked project failed:\n{error.stdout}\n{error.stderr}")
    return Installed(
        answers=baked.answers,
        path=project,
        bin_dir=bin_dir,
        python_version=version,
    )


@pytest.fixture
def database() -> Iterator[str]:
    """A database of this test's own, dropped afterwards; yields its URL."""
    with scratch_database("tse2e") as url:
        yield url


@pytest.fixture
def namespace() -> Iterator[str]:
    """A Celery queue and signal-channel name no one else uses; its Redis keys go afterwards."""
    name = unique_name("tse2e")
    yield name
    forget_namespace(name)


def _output(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    return "\n".join(result.stdout.splitlines()[-lines:])


# --- Django checks ----------------------------------------------------------------------------


def test_system_check_passes(installed: Installed, database: str, namespace: str) -> None:
    result = run(
        [installed.python, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=installed.path,
        env=installed.developer_env(database, namespace),
    )
    exit_code = result.returncode
    assert exit_code == 0, f"manage.py check failed:\n{_output(result)}"


def test_every_model_change_has_a_migration(
    installed: Installed, database: str, namespace: str
) -> None:
    result = run(
        [installed.python, "manage.py", "makemigrations", "--check", "--dry-run"],
        cwd=installed.path,
        env=installed.developer_env(database, namespace),
    )
    exit_code = result.returncode
    assert exit_code == 0, f"models changed without a migration:\n{_output(result)}"


def test_deploy_check_passes_with_production_settings(
    installed: Installed, database: str, namespace: str
) -> None:
    with installed.without_dotenv():
        result = run(
            [installed.python, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
            cwd=installed.path,
            env=project_env(
                installed.bin_dir, **production_values(database=database, namespace=namespace)
            ),
        )
    exit_code = result.returncode
    assert exit_code == 0, f"check --deploy found problems:\n{_output(result)}"


def test_migrations_apply_to_an_empty_database(
    installed: Installed, database: str, namespace: str
) -> None:
    with installed.without_dotenv():
        result = run(
            ["bin/migrate"],
            cwd=installed.path,
            env=project_env(
                installed.bin_dir, **production_values(database=database, namespace=namespace)
            ),
        )
    exit_code = result.returncode
    assert exit_code == 0, f"bin/migrate failed:\n{_output(result)}"


# --- the project's own tests ------------------------------------------------------------------


@pytest.mark.timeout(1200)
def test_project_test_suite_passes(installed: Installed, database: str, namespace: str) -> None:
    # The admin's browser tests must run here: without a browser they fail, not skip.
    env = {**installed.developer_env(database, namespace), "TASKSIGNAL_REQUIRE_BROWSER": "1"}
    result = run(
        [installed.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=installed.path,
        env=env,
        timeout=1100,
    )
    exit_code = result.returncode
    assert exit_code == 0, (
        f"the baked project's own tests failed (exit {result.returncode}):\n{_output(result, 120)}"
    )


# --- lint, types and pre-commit --------------------------------------------------------------


def test_make_lint_passes_ruff_and_mypy(installed: Installed) -> None:
    result = run(
        ["make", "lint"], cwd=installed.path, env=project_env(installed.bin_dir), timeout=600
    )
    exit_code = result.returncode
    assert exit_code == 0, f"make lint failed:\n{_output(result, 80)}"
    assert "Success: no issues found" in result.stdout, f"mypy did not run:\n{_output(result)}"


def test_pre_commit_runs_the_same_checks_offline(installed: Installed, tmp_path: Path) -> None:
    if installed.answers != VARIANT_ANSWERS["default"]:
        pytest.skip("pre-commit is exercised on the default bake")
    env = project_env(installed.bin_dir, PRE_COMMIT_HOME=str(tmp_path / "pre-commit"))
    env |= {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    for command in (["git", "init", "--quiet"], ["git", "add", "--all"]):
        prepared = run(command, cwd=installed.path, env=env)
        assert prepared.returncode == 0, _output(prepared)
    try:
        result = run(
            [str(installed.bin_dir / "pre-commit"), "run", "--all-files"],
            cwd=installed.path,
            env=env,
            timeout=600,
        )
    finally:
        shutil.rmtree(installed.path / ".git", ignore_errors=True)
    exit_code = result.returncode
    assert exit_code == 0, f"pre-commit failed:\n{_output(result, 80)}"
    for hook in ("ruff check", "ruff format --check", "mypy"):
        assert re.search(rf"^{re.escape(hook)}\.+Passed$", result.stdout, re.MULTILINE), (
            f"the {hook} hook did not pass:\n{_output(result)}"
        )


# --- processes --------------------------------------------------------------------------------


@dataclass
class Stack:
    """Procfile processes started for one test; whatever is left is killed at teardown."""

    installed: Installed
    env: dict[str, str]
    log_dir: Path
    web_port: int
    flower_port: int
    services: dict[str, Any] = field(default_factory=dict)

    def start(self, name: str) -> Any:
        """Start the Procfile process ``name`` and wait until it is ready."""
        processes = self.installed.processes
        ready = {
            "web": processes.answers(f"http://127.0.0.1:{self.web_port}/healthz"),
            "worker": processes.logs(processes.WORKER_READY),
            # Past start-up only once it sends the sweep it schedules (every second here).
            "beat": processes.logs(r"Sending due task"),
            "flower": processes.answers(f"http://127.0.0.1:{self.flower_port}/healthcheck"),
        }[name]
        service = processes.ProcessGroup.from_procfile(
            name,
            self.installed.path / "Procfile",
            env=self.env,
            log_path=self.log_dir / f"{name}.log",
            ready=ready,
            ready_timeout=90,
            stop_timeout=STOP_TIMEOUT,
        )
        self.services[name] = service
        try:
            service.start()
        except RuntimeError as error:
            pytest.fail(str(error))
        return service

    def stop(self, name: str) -> tuple[int | None, list[int]]:
        """SIGTERM the main process of ``name``; return its exit code and any pids left."""
        service = self.services[name]
        code = service.terminate(timeout=STOP_TIMEOUT)
        return code, service.wait_for_group_exit()

    def kill_all(self) -> None:
        """Kill every process group this stack started."""
        for service in self.services.values():
            service.stop()


@pytest.fixture
def stack(installed: Installed, database: str, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    """Production settings on a migrated database of this test's own, ready to start processes."""
    web_port, flower_port = installed.processes.free_port(), installed.processes.free_port()
    env = project_env(
        installed.bin_dir,
        **production_values(database=database, namespace=namespace, port=web_port),
        FLOWER_PORT=str(flower_port),
        CELERY_BEAT_SCHEDULE_FILE=str(tmp_path / "celerybeat-schedule"),
        TASKSIGNAL_SWEEP_INTERVAL="1",
    )
    with installed.without_dotenv():
        migrate = run(["bin/migrate"], cwd=installed.path, env=env)
        exit_code = migrate.returncode
        assert exit_code == 0, f"bin/migrate failed:\n{_output(migrate)}"
        started = Stack(installed, env, tmp_path, web_port, flower_port)
        try:
            yield started
        finally:
            started.kill_all()


def test_web_answers_healthz_with_200_through_gunicorn(stack: Stack) -> None:
    web = stack.start("web")  # ready: /healthz answered 200
    assert "gunicorn" in web.log().lower(), "the web process is not gunicorn"


def test_web_and_worker_stop_cleanly_on_sigterm(stack: Stack) -> None:
    stack.start("web")
    stack.start("worker")
    problems = []
    for name in ("web", "worker"):
        code, leftovers = stack.stop(name)
        if code not in GRACEFUL_EXIT_CODES[name]:
            problems.append(
                f"{name} exited with {code} after SIGTERM:\n{stack.services[name].log_tail()}"
            )
        if leftovers:
            problems.append(f"{name} left processes behind after exiting: pids {leftovers}")
    assert not problems, "\n".join(problems)


def test_optional_processes_start_and_stop_cleanly(stack: Stack) -> None:
    optional = [name for name in ("beat", "flower") if name in stack.installed.procfile()]
    if not optional:
        pytest.skip("this variant has neither beat nor flower")
    problems = []
    for name in optional:
        stack.start(name)
        code, leftovers = stack.stop(name)
        if code not in GRACEFUL_EXIT_CODES[name]:
            problems.append(
                f"{name} exited with {code} after SIGTERM:\n{stack.services[name].log_tail()}"
            )
        if leftovers:
            problems.append(f"{name} left processes behind after exiting: pids {leftovers}")
    assert not problems, "\n".join(problems)


def test_worker_runs_a_demo_task_sent_from_the_shell(stack: Stack) -> None:
    if stack.installed.answers["include_demo_tasks"] != "y":
        pytest.skip("this variant has no demo tasks")
    stack.start("worker")
    result = run(
        [
            stack.installed.python,
            "manage.py",
            "shell",
            "-c",
            "from demo.tasks import add; print('result:', add.delay(2, 3).get(timeout=30))",
        ],
        cwd=stack.installed.path,
        env=stack.env,
        timeout=90,
    )
    exit_code = result.returncode
    assert exit_code == 0, f"sending demo.tasks.add failed:\n{_output(result)}"
    assert "result: 5" in result.stdout, f"add(2, 3) did not come back as 5:\n{_output(result)}"


# --- make dev -------------------------------------------------------------------------------

#: A task that outlives honcho's own patience: it SIGKILLs what is left 5 s after Ctrl-C.
DEV_TASK_SECONDS = 8


@contextmanager
def _dotenv_overrides(project: Path, values: Mapping[str, str]) -> Iterator[None]:
    """Append ``values`` to the project's .env for the block (honcho lets .env win over env)."""
    dotenv = project / ".env"
    original = dotenv.read_text(encoding="utf-8")
    lines = "".join(f"{key}={value}\n" for key, value in values.items())
    dotenv.write_text(f"{original}\n# test overrides\n{lines}", encoding="utf-8")
    try:
        yield
    finally:
        dotenv.write_text(original, encoding="utf-8")


def _processes_of(namespace: str) -> list[str]:
    """Processes whose environment names this test's Celery queue (left-over workers)."""
    import psutil  # noqa: PLC0415 - only this test needs it

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("CELERY_TASK_DEFAULT_QUEUE") == namespace:
                found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])}")
        except (psutil.Error, OSError):
            continue
    return found


def test_ctrl_c_on_make_dev_lets_a_running_task_finish(
    installed: Installed, database: str, namespace: str, tmp_path: Path
) -> None:
    if installed.answers["include_demo_tasks"] != "y":
        pytest.skip("this variant has no demo tasks")
    processes = installed.processes
    port = processes.free_port()
    values = isolation_values(database=database, namespace=namespace) | {
        "PORT": str(port),
        "CELERY_BEAT_SCHEDULE_FILE": str(tmp_path / "celerybeat-schedule"),
    }
    healthz, worker_ready = (
        processes.answers(f"http://127.0.0.1:{port}/healthz"),
        processes.logs(processes.WORKER_READY),
    )
    make_dev = processes.ProcessGroup(
        ["make", "dev"],  # its own group: the test's Ctrl-C reaches only make dev
        cwd=installed.path,
        env=project_env(installed.bin_dir, **values),
        log_path=tmp_path / "make-dev.log",
        ready=lambda process: worker_ready(process) and healthz(process),
        ready_timeout=120,
    )
    env = make_dev.env
    with _dotenv_overrides(installed.path, values), make_dev:
        sent = run(
            [
                installed.python, "manage.py", "shell", "-c",
                "from demo.tasks import cooperative_job;"
                f" print('id:', cooperative_job.delay(steps={DEV_TASK_SECONDS * 10},"
                " step_seconds=0.1).id)",
            ],
            cwd=installed.path,
            env=env,
            timeout=90,
        )  # fmt: skip
        assert sent.returncode == 0, f"sending the task failed:\n{_output(sent)}"
        task_id = sent.stdout.split("id:")[-1].split()[0]
        received = processes.logs(rf"cooperative_job\[{task_id}\] received")
        make_dev.wait_until(received, timeout=30, what="running the task")
        time.sleep(1)
        os.killpg(make_dev.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        make_dev.process.wait(timeout=DEV_TASK_SECONDS + 60)
    outcome = run(
        [
            installed.python, "manage.py", "shell", "-c",
            "from celery.result import AsyncResult; from config.celery import app;"
            f" r = AsyncResult('{task_id}', app=app); print('state:', r.state, r.result)",
        ],
        cwd=installed.path,
        env=env,
        timeout=90,
    )  # fmt: skip
    log_text = make_dev.log()
    tail = "\n".join(log_text.splitlines()[-40:])
    assert "WorkerLostError" not in log_text, f"Ctrl-C killed the running task:\n{tail}"
    assert "state: SUCCESS" in outcome.stdout, (
        f"the task running at Ctrl-C did not finish:\n{_output(outcome)}\nmake dev log:\n{tail}"
    )
    deadline = time.monotonic() + 15
    while (left := _processes_of(namespace)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after make dev ended: {left}"
