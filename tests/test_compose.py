"""End to end in containers: the default bake's compose stack, run the way its README says.

A copy of the default bake is brought up once for the module with ``docker compose up --build
--wait`` on a real Docker engine (``scripts/docker_engine.py``: the machine's own engine
packages, a dockerd of the test's own, stand-ins for base images no registry can supply), and
then each test checks one promise of the stack: every service healthy (worker and beat by
their own health checks), migrate run once, ``/healthz`` through the loopback-published port,
no app process as root, the documented superuser and token commands, a cooperative, an
interrupted and a killed cancel through the JSON API, the ``loadtest`` profile as
``docs/loadtest.md`` runs it, ``docker compose stop`` with every container exiting 0, ``down
-v`` leaving nothing, and finally the project's own ``make compose-check``.

Where containers cannot run at all (not Linux, not root, no overlay filesystem, no apt to
install the engine), every test here is skipped with the reason. Set ``TASKSIGNAL_DOCKER_HOST``
to use an engine that already runs (a CI runner's) instead of starting one.

Only what this machine needs is added to the baked project: ``compose.override.yaml`` (git
ignores nothing of it: it lives in the test's scratch copy) lets image builds use the host's
network, because this engine gives containers no route out of the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from baked import PROJECT_VARIABLES, project_processes, run
from conftest import Bake
from docker_engine import Engine, EngineError, EngineUnavailableError, base_images

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

#: Services that run the project's own code (the image's app user), and those that must
#: stay up. migrate is a one-shot; the loadtest profile runs on demand.
APP_SERVICES = ("web", "worker", "beat")
LONG_RUNNING = ("postgres", "redis", "web", "worker", "beat")
UP_TIMEOUT = 600.0
#: Variables that compose.yaml interpolates: a developer's shell must not steer the test.
COMPOSE_VARIABLE_PREFIXES = ("POSTGRES_", "LOADTEST_", "WEB_PUBLISH_", "COMPOSE_", "DOCKER_")


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A Docker engine for the session: started here (and stopped after) unless one is given."""
    docker = Engine()
    try:
        docker.start()
    except EngineUnavailableError as error:
        print(f"\ntest_compose: skipped, containers cannot run here: {error}")
        pytest.skip(f"containers cannot run here: {error}")
    except EngineError as error:
        pytest.fail(f"the Docker engine could not be set up: {error}")
    try:
        yield docker
    finally:
        if docker.started_here:
            docker.stop()


@dataclass
class Stack:
    """A baked project's compose stack and how to talk to it."""

    engine: Engine
    project: Path
    env: dict[str, str]
    port: int
    up: subprocess.CompletedProcess[str] | None = None
    token: str = ""
    stopped: bool = False
    seen: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        """The web service as published on the host."""
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``docker compose ARGS`` in the project (output and errors together)."""
        return run(
            [self.engine.cli(), "compose", *args], cwd=self.project, env=self.env, timeout=timeout
        )

    def logs(self, *services: str, lines: int = 60) -> str:
        """The last log lines of ``services`` (default: all), for failure messages."""
        result = self.compose("logs", "--no-color", "--tail", str(lines), *services, timeout=60)
        return result.stdout

    def containers(self) -> list[dict[str, Any]]:
        """``docker inspect`` of every container of the project, running or not."""
        ids = self.compose("ps", "--all", "--quiet", timeout=60).stdout.split()
        if not ids:
            return []
        inspected = run([self.engine.cli(), "inspect", *ids], cwd=self.project, env=self.env)
        return json.loads(inspected.stdout)

    def service_of(self, container: Mapping[str, Any]) -> str:
        """The compose service a container belongs to."""
        return container["Config"]["Labels"].get("com.docker.compose.service", "?")

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call the JSON API through the published port with the stack's token."""
        request = urllib.request.Request(  # noqa: S310 - loopback, our own server
            f"{self.base_url}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read()[:500]
            pytest.fail(f"{method} {path} answered {error.code}: {detail!r}\n{self.logs('web')}")


def _compose_env(engine: Engine, project_name: str, port: int) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if key not in PROJECT_VARIABLES and not key.startswith(COMPOSE_VARIABLE_PREFIXES)
    }
    environment = engine.env(base)
    environment.update(
        COMPOSE_PROJECT_NAME=project_name,
        WEB_PUBLISH_PORT=str(port),
        # Plain build output in the captured logs, not a terminal progress display.
        BUILDKIT_PROGRESS="plain",
    )
    return environment


def _write_build_network_override(project: Path) -> Path:
    """Let every build of the project use the host's network (this engine routes nothing out)."""
    compose = yaml.safe_load((project / "compose.yaml").read_text(encoding="utf-8"))
    built = sorted(name for name, service in compose["services"].items() if "build" in service)
    override = project / "compose.override.yaml"
    override.write_text(
        "# Written by the template's compose test: builds reach PyPI through the host's network\n"
        "# because this Docker engine gives containers no route out of the machine.\n"
        + yaml.safe_dump({"services": {name: {"build": {"network": "host"}} for name in built}}),
        encoding="utf-8",
    )
    return override


@pytest.fixture(scope="module")
def stack(
    engine: Engine,
    bake: Callable[[Mapping[str, str]], Bake],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The default bake's stack after ``docker compose up --build --wait``; removed afterwards."""
    baked = bake({})
    project = tmp_path_factory.mktemp("compose") / baked.project.name
    shutil.copytree(baked.project, project, symlinks=True)
    if not engine.external:
        _write_build_network_override(project)
    try:
        engine.ensure_images(base_images(project))
    except EngineUnavailableError as error:
        pytest.skip(f"the base images cannot be had here: {error}")
    except EngineError as error:
        pytest.fail(f"the base images could not be made: {error}")
    port = project_processes(project).free_port()
    project_name = f"tscompose{uuid.uuid4().hex[:8]}"
    started = Stack(engine, project, _compose_env(engine, project_name, port), port)
    try:
        started.up = started.compose("up", "--build", "--wait", timeout=UP_TIMEOUT)
        yield started
    finally:
        started.compose("--profile", "loadtest", "down", "--volumes", "--remove-orphans")


@pytest.fixture(scope="module")
def up(stack: Stack) -> Stack:
    """The stack, failing the test at once with the output when ``up --wait`` did not succeed."""
    assert stack.up is not None
    if stack.up.returncode != 0:
        output = "\n".join(stack.up.stdout.splitlines()[-60:])
        pytest.fail(
            f"`docker compose up --build --wait` exited {stack.up.returncode}:\n{output}\n"
            f"--- logs ---\n{stack.logs()}"
        )
    return stack


@pytest.fixture(scope="module")
def api(up: Stack) -> Stack:
    """The stack with an API token of a superuser made with the README's commands."""
    if not up.token:
        _make_superuser_and_token(up)
    return up


def _make_superuser_and_token(stack: Stack) -> None:
    created = stack.compose(
        "exec", "-T", "-e", "DJANGO_SUPERUSER_PASSWORD=compose-test-only",
        "web", "python", "manage.py", "createsuperuser", "--noinput",
        "--username", "admin", "--email", "admin@example.com",
    )  # fmt: skip
    assert created.returncode == 0, f"createsuperuser failed:\n{created.stdout}"
    token = stack.compose(
        "exec", "-T", "web", "python", "manage.py", "create_api_token", "admin",
        "--name", "compose test",
    )  # fmt: skip
    assert token.returncode == 0, f"create_api_token failed:\n{token.stdout}"
    # The token alone on its line (stdout); the advice around it goes to stderr.
    printed = [line.strip() for line in token.stdout.splitlines() if line.strip()]
    stack.token = next((line for line in printed if re.fullmatch(r"tsk_\S+", line)), "")
    assert stack.token.startswith("tsk_"), f"create_api_token printed no token:\n{token.stdout}"


# --- bringing it up -------------------------------------------------------------------------


def test_up_wait_leaves_every_service_healthy(up: Stack) -> None:
    problems = []
    for container in up.containers():
        service, state = up.service_of(container), container["State"]
        if service not in LONG_RUNNING:
            continue
        health = (state.get("Health") or {}).get("Status")
        if state["Status"] != "running" or health != "healthy":
            problems.append(f"{service}: {state['Status']}, health {health}")
    services = {up.service_of(container) for container in up.containers()}
    missing = sorted(set(LONG_RUNNING) - services)
    assert not problems, f"services not running and healthy: {problems}\n{up.logs()}"
    assert not missing, f"services that never started: {missing}\n{up.logs()}"


def test_migrate_ran_exactly_once_and_exited_zero(up: Stack) -> None:
    migrations = [c for c in up.containers() if up.service_of(c) == "migrate"]
    assert len(migrations) == 1, f"{len(migrations)} migrate containers, expected one"
    state = migrations[0]["State"]
    assert state["Status"] == "exited", f"migrate is {state['Status']}, not a finished one-shot"
    assert state["ExitCode"] == 0, f"migrate exited {state['ExitCode']}:\n{up.logs('migrate')}"
    assert migrations[0]["RestartCount"] == 0, "migrate was restarted"
    runs = up.logs("migrate", lines=1000).count("Operations to perform")
    assert runs == 1, f"migrate ran {runs} times:\n{up.logs('migrate')}"


def test_up_builds_the_app_image_once_and_pulls_nothing(up: Stack) -> None:
    assert up.up is not None
    slug = up.project.name
    output = up.up.stdout
    builds = output.count(f"naming to docker.io/library/{slug}:latest")
    assert builds == 1, f"the app image was built {builds} times, expected once:\n{output[-3000:]}"
    assert " Pulling" not in output, f"compose tried to pull an image:\n{output[-3000:]}"


def test_healthz_answers_200_on_the_loopback_published_port(up: Stack) -> None:
    published = up.compose("port", "web", "8000").stdout.strip()
    assert published == f"127.0.0.1:{up.port}", (
        f"web is published on {published!r}, expected loopback port {up.port} (WEB_PUBLISH_PORT)"
    )
    with urllib.request.urlopen(f"{up.base_url}/healthz", timeout=10) as response:  # noqa: S310
        assert response.status == 200, f"/healthz answered {response.status}"


def test_no_process_in_the_app_containers_runs_as_root(up: Stack) -> None:
    rooted = []
    for service in APP_SERVICES:
        top = up.compose("top", service).stdout.splitlines()
        # Columns: UID PID PPID C STIME TTY TIME CMD (UID as a number or a name).
        processes = [
            line.split() for line in top if len(line.split()) > 7 and line.split()[1].isdigit()
        ]
        assert processes, f"`docker compose top {service}` listed no process:\n{top}"
        rooted += [f"{service}: {' '.join(p[7:])}" for p in processes if p[0] in {"0", "root"}]
    assert not rooted, "processes running as root:\n" + "\n".join(rooted)


def test_superuser_and_token_come_from_the_documented_commands(api: Stack) -> None:
    # An unknown task id: 404 for a valid token, 401 for a bad one.
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{api.base_url}/api/tasks/{uuid.uuid4()}/",
        headers={"Authorization": f"Bearer {api.token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310
    assert answer.value.code == 404, (
        f"the token made with create_api_token got {answer.value.code}, expected 404:"
        f" {answer.value.read()[:300]!r}"
    )


# --- cancels through the JSON API -----------------------------------------------------------


def _wait(condition: Callable[[], Any], timeout: float, what: str, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{stack.logs('worker')}")


@pytest.mark.parametrize(
    ("task", "kwargs", "outcome"),
    [
        ("demo.tasks.cooperative_job", {"steps": 600, "step_seconds": 0.05}, "cooperative"),
        ("demo.tasks.sleepy_job", {"seconds": 60}, "interrupted"),
        ("demo.tasks.gil_job", {}, "killed"),
    ],
    ids=["cooperative", "interrupted", "killed"],
)
def test_a_running_task_cancelled_through_the_api_stops(
    api: Stack, task: str, kwargs: dict[str, Any], outcome: str
) -> None:
    task_id = api.api("POST", "/api/tasks/", {"task": task, "kwargs": kwargs})["id"]
    # A task stuck in C code holding the GIL cannot write its own "running" record: for that
    # one the worker's log line that it received the task is the sign that it runs.
    _wait(
        lambda: (
            f"{task}[{task_id}] received" in api.logs("worker", lines=200)
            if outcome == "killed"
            else api.api("GET", f"/api/tasks/{task_id}/")["run_state"] == "running"
        ),
        30,
        f"{task} {task_id} to run",
        api,
    )
    if outcome == "killed":
        time.sleep(0.5)
    api.api("POST", f"/api/tasks/{task_id}/cancel/", {"message": "compose test"})
    final = _wait(
        lambda: (
            (body := api.api("GET", f"/api/tasks/{task_id}/"))["state"] == "REVOKED"
            and body["outcome"]
            and body
        ),
        30,
        f"{task} {task_id} to be REVOKED with an outcome",
        api,
    )
    assert final["outcome"] == outcome, (
        f"{task} stopped by {final['outcome']!r}, expected {outcome!r}: {final}\n"
        f"{api.logs('worker')}"
    )


# --- the load test --------------------------------------------------------------------------


def test_loadtest_profile_passes_and_writes_its_summary_on_the_host(api: Stack) -> None:
    reports = api.project / "loadtest" / "reports"
    summary_path = reports / "storm-summary.json"
    summary_path.unlink(missing_ok=True)
    result = api.compose(
        "--profile", "loadtest", "run", "--rm", "-e", "LOADTEST_DURATION=15s", "loadtest",
        timeout=600,
    )  # fmt: skip
    output = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, (
        f"the loadtest profile exited {result.returncode}:\n{output}\n{api.logs('worker')}"
    )
    assert " Pulling" not in result.stdout, f"compose tried to pull an image:\n{output}"
    assert summary_path.is_file(), f"no {summary_path.name} on the host:\n{output}"
    owner = summary_path.stat().st_uid
    assert owner == os.getuid(), f"the summary belongs to uid {owner}, not to you ({os.getuid()})"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    counts, outcomes = summary["counts"], summary["outcomes"]
    assert summary["passed"], f"the storm did not pass: {summary['gate']} {summary['failures']}"
    assert counts["honoured"] > 0, f"nothing was cancelled: {counts}"
    skipped = outcomes.get("skipped", {}).get("count", 0)
    assert skipped * 2 < counts["honoured"], (
        f"{skipped} of {counts['honoured']} cancels found their task still queued: the load does"
        f" not match the worker ({summary['users']}): {outcomes}"
    )


# --- stopping -------------------------------------------------------------------------------


def test_stop_ends_every_container_with_exit_code_zero(up: Stack) -> None:
    result = up.compose("stop", timeout=180)
    up.stopped = True
    assert result.returncode == 0, (
        f"docker compose stop exited {result.returncode}:\n{result.stdout}"
    )
    codes = {
        container["Name"].lstrip("/"): container["State"]["ExitCode"]
        for container in up.containers()
    }
    unclean = {name: code for name, code in codes.items() if code != 0}
    assert codes, "no containers left to inspect"
    assert not unclean, f"containers that did not exit 0 on stop: {unclean}\n{up.logs()}"


def test_down_volumes_leaves_no_container_network_or_volume(up: Stack) -> None:
    result = up.compose("--profile", "loadtest", "down", "--volumes", "--remove-orphans")
    assert result.returncode == 0, f"docker compose down -v failed:\n{result.stdout}"
    label = f"label=com.docker.compose.project={up.env['COMPOSE_PROJECT_NAME']}"
    listings = {
        "container": ["ps", "--all", "--quiet", "--filter", label],
        "network": ["network", "ls", "--quiet", "--filter", label],
        "volume": ["volume", "ls", "--quiet", "--filter", label],
    }
    leftovers = {
        kind: run([up.engine.cli(), *command], cwd=up.project, env=up.env).stdout.split()
        for kind, command in listings.items()
    }
    assert not any(leftovers.values()), f"left behind after down -v: {leftovers}"


# --- the project's own check ----------------------------------------------------------------


def test_make_compose_check_passes(up: Stack) -> None:
    result = run(["make", "compose-check"], cwd=up.project, env=up.env, timeout=900)
    output = "\n".join(result.stdout.splitlines()[-60:])
    assert result.returncode == 0, f"make compose-check exited {result.returncode}:\n{output}"
    assert "compose-check: passed" in result.stdout, f"make compose-check did not pass:\n{output}"
