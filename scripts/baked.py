"""Bake, install and run a generated project: the kit shared by the tests and ``make demo``.

Everything here talks only to the machine itself: PostgreSQL and Redis on the URLs in
``DATABASE_URL`` and ``REDIS_URL`` (defaults below), PyPI through ``uv`` for installs, and
loopback ports for the processes it starts. Nothing is flushed or stopped that this module did
not create: databases are created under unique names and dropped by name, processes are started
in their own process group and only that group is ever signalled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Final
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL: Final = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"

#: Variables a baked project reads. They are dropped from the inherited environment so that a
#: developer's shell cannot leak its own settings into a test or the demo.
PROJECT_VARIABLES: Final = frozenset(
    {
        "DJANGO_SETTINGS_MODULE",
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
        "DJANGO_DEBUG",
        "DATABASE_URL",
        "REDIS_URL",
        "CELERY_BROKER_URL",
        "CELERY_RESULT_BACKEND",
        "CELERY_TASK_DEFAULT_QUEUE",
        "TASKSIGNAL_CHANNEL",
        "PORT",
        "WEB_CONCURRENCY",
        "CELERY_WORKER_CONCURRENCY",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTEST_ADDOPTS",
    },
)


def database_url() -> str:
    """Return the maintenance-database URL of the PostgreSQL server to use."""
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def redis_url() -> str:
    """Return the URL of the Redis server to use."""
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def with_path(url: str, path: str) -> str:
    """Return ``url`` with its path replaced (a database name, a Redis database number).

    >>> with_path("postgres://postgres@127.0.0.1:5432/postgres", "demo_1")
    'postgres://postgres@127.0.0.1:5432/demo_1'
    """
    return urlunsplit(urlsplit(url)._replace(path=f"/{path}"))


def redact(url: str) -> str:
    """Hide the password in ``url`` for printing.

    >>> redact("postgres://app:s3cret@db:5432/app")
    'postgres://app:***@db:5432/app'
    >>> redact("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostinfo}"))


def unique_name(prefix: str) -> str:
    """Return ``prefix`` plus a random suffix: a safe PostgreSQL name or Celery queue name.

    >>> name = unique_name("tse2e")
    >>> name.startswith("tse2e_") and len(name) == len("tse2e_") + 12
    True
    """
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _connect_maintenance(url: str):  # psycopg is imported lazily: only some callers need it
    import psycopg  # noqa: PLC0415 - only the callers that touch PostgreSQL need it

    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def create_database(name: str, *, server_url: str | None = None) -> str:
    """Create database ``name`` and return its URL."""
    server = server_url or database_url()
    with _connect_maintenance(server) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return with_path(server, name)


def drop_database(name: str, *, server_url: str | None = None) -> None:
    """Drop database ``name`` and the ``test_`` copy pytest-django may have left; never fails."""
    server = server_url or database_url()
    with suppress(Exception), _connect_maintenance(server) as connection:
        for database in (name, f"test_{name}"):
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """Create a uniquely named database for the duration of the block; yield its URL."""
    name = unique_name(prefix)
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


def forget_namespace(namespace: str) -> int:
    """Delete the Redis keys whose names contain ``namespace``; return how many went.

    A namespace from :func:`unique_name` is ours alone, so this removes only what our own
    workers and producers created (queues, bindings, signal keys). Never fails.
    """
    import redis  # noqa: PLC0415 - only the callers that touch Redis need it

    try:
        client = redis.Redis.from_url(redis_url(), socket_timeout=5)
        with client:
            keys = list(client.scan_iter(match=f"*{namespace}*", count=1000))
            return client.delete(*keys) if keys else 0
    except redis.RedisError:
        return 0


# --- baking -----------------------------------------------------------------------------------


def bake(
    output_dir: Path,
    extra_context: Mapping[str, str] | None = None,
    *,
    template: Path = REPO_ROOT,
) -> Path:
    """Generate a project from the template into ``output_dir``; return the project folder."""
    from cookiecutter.main import cookiecutter  # noqa: PLC0415 - not every caller bakes

    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(
        cookiecutter(
            str(template),
            no_input=True,
            extra_context=dict(extra_context or {}),
            output_dir=str(output_dir),
            config_file=str(private_cookiecutter_config(output_dir / ".cookiecutter-user")),
        ),
    )


def private_cookiecutter_config(folder: Path) -> Path:
    """Write a cookiecutter user config that keeps replays and clones inside ``folder``.

    Baking then neither reads the developer's ``~/.cookiecutterrc`` nor writes into their home.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(
        f"cookiecutters_dir: {json.dumps(str(folder / 'cookiecutters'))}\n"
        f"replay_dir: {json.dumps(str(folder / 'replay'))}\n",
        encoding="utf-8",
    )
    return config


# --- installing -------------------------------------------------------------------------------


def uv_binary() -> str:
    """Return the path of the ``uv`` executable installed beside the running Python."""
    from uv import find_uv_bin  # noqa: PLC0415 - the uv package is only needed to install

    return find_uv_bin()


def _python_version_of(executable: str) -> str | None:
    try:
        completed = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def find_python(version: str) -> str | None:
    """Find an interpreter for ``version`` ("3.12") on this machine, without downloading one.

    Looks at the running interpreter, ``pythonX.Y`` on ``PATH``, pyenv's versions and the
    usual system folders; returns the first that really is that version.
    """
    candidates = [sys.executable, shutil.which(f"python{version}")]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [
        str(path)
        for path in sorted((pyenv_root / "versions").glob(f"{version}*/bin/python{version}"))
    ]
    candidates += [f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for candidate in candidates:
        if candidate and Path(candidate).exists() and _python_version_of(candidate) == version:
            return candidate
    return None


def create_venv(project_dir: Path, python: str, *, extras: str = "dev") -> Path:
    """Create ``project_dir/.venv`` with ``python`` and install the project as its lock says.

    Exactly the pins of ``requirements-dev.txt`` (``extras="dev"``) or ``requirements.txt``
    (``extras=""``), hashes checked, as the project's own ``make install`` and image do; then
    the project itself, editable, without dependencies, and ``uv pip check`` to prove the lock
    complete. Returns the virtualenv's ``bin`` folder. Raises
    ``subprocess.CalledProcessError`` with uv's output when a step fails.
    """
    venv = project_dir / ".venv"
    venv_python = str(venv / "bin" / "python")
    lock_file = project_dir / ("requirements-dev.txt" if extras == "dev" else "requirements.txt")
    uv = uv_binary()
    environment = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    environment.pop("VIRTUAL_ENV", None)
    pip = [uv, "pip"]
    into = ["--quiet", "--python", venv_python]
    for command in (
        [uv, "venv", "--quiet", "--python", python, str(venv)],
        [*pip, "sync", *into, "--require-hashes", str(lock_file)],
        [*pip, "install", *into, "--no-deps", "--editable", str(project_dir)],
        [*pip, "check", *into],
    ):
        subprocess.run(
            command,
            check=True,
            capture_output=True,
            text=True,
            env=environment,
            timeout=900,
        )
    return venv / "bin"


# --- environment ------------------------------------------------------------------------------


def project_env(bin_dir: Path, **values: str) -> dict[str, str]:
    """Return the environment for running a baked project from the virtualenv ``bin_dir``.

    Starts from this process's environment without any variable the project reads, puts the
    virtualenv first on ``PATH``, then applies ``values``.
    """
    environment = {key: value for key, value in os.environ.items() if key not in PROJECT_VARIABLES}
    environment["PATH"] = f"{bin_dir}{os.pathsep}{environment.get('PATH', '')}"
    environment["VIRTUAL_ENV"] = str(bin_dir.parent)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(values)
    return environment


def isolation_values(*, database: str, namespace: str) -> dict[str, str]:
    """Return the settings that keep one run apart from every other user of the servers.

    Its own database, its own Celery queue and its own task-signal channel: a worker started
    with these consumes nothing of anyone else's and hears no one else's signals. The broker
    and result backend are left to default to ``REDIS_URL``, as on a developer's machine.
    """
    return {
        "DATABASE_URL": database,
        "REDIS_URL": redis_url(),
        "CELERY_TASK_DEFAULT_QUEUE": namespace,
        "TASKSIGNAL_CHANNEL": f"{namespace}:tasksignal",
    }


def production_values(*, database: str, namespace: str, port: int | None = None) -> dict[str, str]:
    """Return realistic production settings for a run on this machine, isolated by ``namespace``."""
    broker = redis_url()
    values = isolation_values(database=database, namespace=namespace) | {
        "CELERY_BROKER_URL": broker,
        "CELERY_RESULT_BACKEND": broker,
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_DEBUG": "False",
        "WEB_CONCURRENCY": "2",
        "CELERY_WORKER_CONCURRENCY": "2",
    }
    if port is not None:
        values["PORT"] = str(port)
    return values


# --- processes --------------------------------------------------------------------------------


def project_processes(project: Path) -> ModuleType:
    """Load ``tasksignal/processes.py`` of the baked ``project``: how it runs its processes.

    The template keeps no process runner of its own: ``make demo`` and the end-to-end tests
    start a bake's Procfile processes with the bake's own code (process groups, readiness,
    teardown, honcho's Procfile parser), so they exercise what its users get. The module
    imports no Django and nothing else of the project, so it loads here from its file,
    under a name of its own per bake (bakes of one session may differ).

    >>> template_project = REPO_ROOT / "{{cookiecutter.project_slug}}"
    >>> processes = project_processes(template_project)
    >>> processes.procfile_commands(template_project / "Procfile")["worker"]
    'bin/worker'
    """
    path = project / "tasksignal" / "processes.py"
    name = f"baked_processes_{uuid.uuid5(uuid.NAMESPACE_URL, str(path.resolve())).hex}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no tasksignal/processes.py in {project}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(
    command: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to completion and return it (output captured, stderr into stdout)."""
    return subprocess.run(
        command,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
