"""``make demo``: bake the default project and run it natively against local PostgreSQL and Redis.

Steps, each printed as it happens:

1. bake the template with its defaults into ``.demo/`` (replacing an earlier demo);
2. install the project into ``.demo/<slug>/.venv`` with uv;
3. create a database of its own and migrate it (``bin/migrate``);
4. start ``web`` (gunicorn, ``bin/web``) and ``worker`` (``bin/worker``) from the Procfile,
   with the bake's own process runner (``tasksignal/processes.py``);
5. GET ``/healthz``, then ``manage.py show_ladder``: a cooperative job, one writing rows in a
   transaction, one asleep in ``time.sleep``, one blocked on a socket and one stuck in C
   holding the GIL, each cancelled next to a sibling nobody cancels, shown as a table (the
   ladder step, the latency on the database clock, whether cleanup ran, the sibling's
   result), then the GIL-bound job under Celery's ``revoke(terminate=True)`` for contrast;
6. stop both with SIGTERM, report how they exited, and drop the database.

The worker consumes a queue of its own, so a demo never takes another user's tasks.
Exit status: 0 when every step worked, 1 otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Final

from baked import (
    REPO_ROOT,
    bake,
    create_database,
    create_venv,
    drop_database,
    find_python,
    forget_namespace,
    production_values,
    project_env,
    project_processes,
    redact,
    run,
    unique_name,
)

DEMO_DIR: Final = REPO_ROOT / ".demo"


def step(message: str) -> None:
    """Print a numbered-looking progress line."""
    print(f"==> {message}", flush=True)


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


def _install(project: Path) -> Path:
    choices = json.loads((REPO_ROOT / "cookiecutter.json").read_text(encoding="utf-8"))
    python = find_python(choices["python_version"][0]) or sys.executable
    step(f"installing into {project.relative_to(REPO_ROOT)}/.venv with uv (Python {python})")
    return create_venv(project, python, extras="")


def _stop(services: list) -> list[str]:
    """SIGTERM each main process, as a platform does; say how it exited and what it left."""
    problems = []
    for service in reversed(services):
        if service.process is None:  # its start failed before it ran
            continue
        started = time.monotonic()
        code = service.terminate(timeout=30)
        leftovers = service.wait_for_group_exit()
        took = time.monotonic() - started
        step(f"{service.name} got SIGTERM and exited with {code} after {took:.1f} s")
        if code != 0:
            problems.append(f"{service.name} exited with {code}")
        if leftovers:
            problems.append(f"{service.name} left processes {leftovers}")
        service.stop()
    return problems


def run_demo() -> None:
    """Do every step; raise ``DemoError`` on the first that fails."""
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    step(f"baking the default project into {DEMO_DIR.relative_to(REPO_ROOT)}/")
    project = bake(DEMO_DIR)
    bin_dir = _install(project)

    namespace = unique_name("tsdemo")
    database = create_database(namespace)
    step(f"created database {redact(database)}")
    processes = project_processes(project)
    services: list = []
    try:
        port = processes.free_port()
        values = production_values(database=database, namespace=namespace, port=port)
        # Five jobs, a sibling and the revoke contrast run at once.
        env = project_env(bin_dir, **(values | {"CELERY_WORKER_CONCURRENCY": "8"}))
        # Production settings, everything that matters set here; these beat the .env file.
        step("migrating: bin/migrate")
        migrated = run(["bin/migrate"], cwd=project, env=env)
        if migrated.returncode != 0:
            raise DemoError(f"bin/migrate failed:\n{migrated.stdout}")

        healthz = f"http://127.0.0.1:{port}/healthz"
        for name, ready in (
            ("web", processes.answers(healthz)),
            ("worker", processes.logs(processes.WORKER_READY)),
        ):
            service = processes.ProcessGroup.from_procfile(
                name,
                project / "Procfile",
                env=env,
                log_path=project.parent / f"{name}.log",
                ready=ready,
                ready_timeout=90,
                stop_timeout=30,
            )
            step(f"starting {name}: {' '.join(service.command[2:])}")
            services.append(service)
            try:
                service.start()
            except RuntimeError as error:
                raise DemoError(str(error)) from error
        step(f"GET {healthz} -> 200; worker ready, consuming queue {namespace}")

        step("python manage.py show_ladder: each shape of job cancelled next to a sibling")
        shown = run(
            [str(bin_dir / "python"), "manage.py", "show_ladder"],
            cwd=project,
            env=env,
            timeout=120,
        )
        print(shown.stdout, end="")
        if shown.returncode != 0:
            raise DemoError("the ladder did not hold: see the table above")
    finally:
        problems = _stop(services)
        drop_database(namespace)
        forget_namespace(namespace)
        step(f"dropped database {namespace} and the Redis keys of queue {namespace}")
        for service in services:
            print(f"    {service.name} log: {service.log_path.relative_to(REPO_ROOT)}")
    if problems:
        raise DemoError("; ".join(problems))


def main() -> int:
    """Run the demo and report how it went."""
    try:
        run_demo()
    except DemoError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    step("demo finished: every job stopped by its step, the sibling intact, all stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
