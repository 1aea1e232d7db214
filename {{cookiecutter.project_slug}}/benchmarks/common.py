"""What every benchmark shares: Django set-up, the worker, statistics, results and markers.

A benchmark script calls :func:`setup` before it imports anything from Django or the
project: it gives the run its own Celery queue, signal channel and broker key prefix (so
the run neither takes nor disturbs anybody else's tasks), turns ``DEBUG`` off (Django then
keeps no log of queries, as in production) and sets Django up.

Tasks tell the driver that they are running, and on which process, with *markers*: small
Redis keys written by :func:`mark` in the worker and read by :func:`wait_for_mark` here.
They cost the task one Redis ``SET`` before the part being measured.
"""

import argparse
import contextlib
import datetime
import importlib
import json
import os
import pkgutil
import platform
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Markers expire on their own, so an interrupted run leaves nothing behind for long.
MARKER_TTL = 600
#: A worker log line saying a task message arrived (twice for one id: a redelivery).
RECEIVED = re.compile(r"Task \S+\[(?P<id>[0-9a-f-]{36})\] received")
#: Settings module used when ``DJANGO_SETTINGS_MODULE`` is not set.
DEFAULT_SETTINGS = "config.settings.local"

_run_id: str | None = None
_redis_clients: dict = {}


# -- set-up ----------------------------------------------------------------------------
def setup() -> str:
    """Set Django up for a benchmark run (once per process); return the run's id.

    The queue (``CELERY_TASK_DEFAULT_QUEUE``), the signal channel (``TASKSIGNAL_CHANNEL``)
    and the broker's key prefix (``CELERY_BROKER_KEY_PREFIX``) are always replaced by names
    unique to the run, whatever the environment or ``.env`` says: a benchmark must never
    consume a real queue, nor have its messages redelivered by somebody else's worker.
    """
    global _run_id
    if _run_id is not None:
        return _run_id
    _run_id = f"bench-{uuid.uuid4().hex[:10]}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", DEFAULT_SETTINGS)
    os.environ["CELERY_TASK_DEFAULT_QUEUE"] = _run_id
    os.environ["TASKSIGNAL_CHANNEL"] = f"{_run_id}:tasksignal"
    # Broker keys of their own too: kombu keeps unacknowledged messages in one hash per
    # key prefix, and any worker sharing it may redeliver them (its visibility timeout).
    os.environ["CELERY_BROKER_KEY_PREFIX"] = f"{_run_id}:"
    os.environ["DJANGO_DEBUG"] = "False"
    project_dir = str(Path(__file__).resolve().parent.parent)
    if project_dir not in sys.path:
        sys.path.insert(0, project_dir)

    import django

    django.setup()
    import config.celery  # noqa: F401 - makes the project's Celery app the current one

    _check_migrated()
    return _run_id


def discover() -> dict[str, ModuleType]:
    """Every benchmark of this folder, by name: each module that defines ``NAME`` and
    ``measure``.

    Adding a benchmark is adding such a file (beside them: ``DESCRIPTION``, the ``DEFAULTS``
    and ``QUICK`` sizes with a ``SIZES_HELP`` line each, ``report`` for its short table and
    ``markdown`` for the README's); nothing lists them. Call :func:`setup` first: the module
    of the tasks imports Django.
    """
    found = {}
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if info.name.startswith("_"):  # __main__ would run them all on import
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        if isinstance(getattr(module, "NAME", None), str) and callable(
            getattr(module, "measure", None)
        ):
            found[module.NAME] = module
    return dict(sorted(found.items()))


def _check_migrated() -> None:
    from django.db import DEFAULT_DB_ALIAS, connections
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        raise SystemExit(
            "The database has unapplied migrations: run `python manage.py migrate` first."
        )


@dataclass
class Measured:
    """What a benchmark's ``measure(**sizes, output_dir)`` returns: its figures, the targets
    they are held to (:func:`target`), notes for the reader, the problems of its worker's log
    (:func:`worker_log_problems`) and any fixed facts of its set-up worth recording beside
    its sizes. :func:`run` turns it into the benchmark's JSON document."""

    results: dict
    targets: list[dict]
    notes: list[str]
    worker_log: dict
    parameters: dict = field(default_factory=dict)


def run(
    module: ModuleType,
    overrides: dict | None = None,
    *,
    quick: bool = False,
    output_dir: Path | None = None,
) -> dict:
    """Run the benchmark ``module`` and return its JSON document, also written to
    ``<output_dir>/<NAME>.json`` and printed as its short table (``module.report``).

    Everything but the measuring is done here, the same for every benchmark: the set-up,
    the machine's state before and after, the document and its file. The sizes are the
    module's ``QUICK`` (with ``quick``) or ``DEFAULTS``, with ``overrides`` over them.
    """
    setup()
    sizes = {**(module.QUICK if quick else module.DEFAULTS), **(overrides or {})}
    vacuum()
    started = time.monotonic()
    environment_before = environment()
    measured = module.measure(**sizes, output_dir=output_dir)
    payload = result_payload(
        module.NAME,
        description=module.DESCRIPTION,
        quick=quick,
        parameters={**sizes, **measured.parameters},
        results=measured.results,
        targets=measured.targets,
        notes=measured.notes,
        started=started,
        environment_before=environment_before,
        worker_log=measured.worker_log,
    )
    path = write_result(module.NAME, payload, output_dir)
    module.report(payload, path)
    return payload


def vacuum() -> None:
    """``VACUUM ANALYZE`` the tables of tasksignal, so that a benchmark measures the code and
    not the dead rows an earlier one left (each deletes what it wrote; PostgreSQL's
    autovacuum may be off, or behind, on a test server)."""
    from django.apps import apps
    from django.db import connection

    tables = [model._meta.db_table for model in apps.get_app_config("tasksignal").get_models()]
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {', '.join(connection.ops.quote_name(t) for t in tables)}")


def main(module: ModuleType, argv: Sequence[str] | None = None) -> dict:
    """The command line of one benchmark, ``python -m benchmarks.<name>``: ``--quick``,
    ``--output-dir`` and an option a size of ``module.DEFAULTS`` (``--rounds 10``; a list
    takes several values, a size that is on by default is turned off by ``--no-<size>``)."""
    parser = argument_parser(module.__doc__.splitlines()[0])
    for name, default in module.DEFAULTS.items():
        option, help_text = name.replace("_", "-"), module.SIZES_HELP[name]
        if isinstance(default, bool):
            parser.add_argument(
                f"--no-{option}",
                dest=name,
                action="store_false",
                default=None,
                help=f"leave out {help_text}",
            )
        elif isinstance(default, tuple | list):
            parser.add_argument(f"--{option}", type=type(default[0]), nargs="+", help=help_text)
        else:
            parser.add_argument(f"--{option}", type=type(default), help=help_text)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in module.DEFAULTS and v is not None}
    return run(module, overrides, quick=args.quick, output_dir=args.output_dir)


@contextlib.contextmanager
def benchmark_worker(
    name: str, output_dir: Path | None = None, *, concurrency: int = 2, env: dict | None = None
) -> Iterator:
    """Start a prefork worker with the benchmark tasks on this run's queue; stop it after.

    Yields the :class:`~tasksignal.testing.WorkerProcess`. Its log (INFO level) is
    ``<output_dir>/<name>.worker.log``, replaced on each run. ``env`` adds environment
    variables (settings) for the worker only.
    """
    from tasksignal.testing import WorkerProcess

    folder = Path(output_dir) if output_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{name}.worker.log"
    log_path.unlink(missing_ok=True)
    worker = WorkerProcess(
        concurrency=concurrency,
        hostname=f"{setup()}-{name}@%h",
        env={"CELERY_LOG_LEVEL": "INFO", **(env or {})},
        extra_args=("--include", "benchmarks.tasks"),
        log_path=log_path,
        ready_timeout=60.0,
    )
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def worker_log_problems(path: Path, expected: Sequence[str] = (), examples: int = 5) -> dict:
    """Count the WARNING and ERROR lines of a worker log and quote the first few.

    A benchmark whose worker logged problems (say, PostgreSQL refusing connections because
    the machine is busy) has figures that describe the problem, not the code: the count
    goes into the JSON so that nobody mistakes one for the other. Lines containing one of
    ``expected`` (say, the node's warning for a kill the benchmark asked for) are not
    counted.
    """
    counts = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0}
    quoted: list[str] = []
    received: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {"warnings": None, "errors": None, "redelivered": None, "examples": ["(no log)"]}
    for line in lines:
        match = RECEIVED.search(line)
        if match:
            received[match["id"]] = received.get(match["id"], 0) + 1
        level = next((name for name in counts if f" {name} " in line), None)
        if level is None or any(text in line for text in expected):
            continue
        counts[level] += 1
        message = line.split(f" {level} ", 1)[1][:200]
        if len(quoted) < examples and message not in quoted:
            quoted.append(message)
    return {
        "path": str(path),
        "warnings": counts["WARNING"],
        "errors": counts["ERROR"] + counts["CRITICAL"],
        "redelivered": sum(1 for count in received.values() if count > 1),
        "examples": quoted,
    }


def environment() -> dict:
    """What the figures depend on: machine, versions, settings, date and load."""
    from django.conf import settings
    from django.db import connection

    def version(distribution: str) -> str | None:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres = cursor.fetchone()[0]
    try:
        redis_version = redis_client().info("server").get("redis_version")
    except Exception:  # a figure for the record, not a reason to fail
        redis_version = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "billiard": version("billiard"),
        "django": version("django"),
        "redis_py": version("redis"),
        "psycopg": version("psycopg"),
        "postgresql": postgres,
        "redis": redis_version,
        "settings_module": settings.SETTINGS_MODULE,
        "debug": settings.DEBUG,
        "task_acks_late": settings.CELERY_TASK_ACKS_LATE,
        "worker_prefetch_multiplier": settings.CELERY_WORKER_PREFETCH_MULTIPLIER,
        "tasksignal_record_runs": getattr(settings, "TASKSIGNAL_RECORD_RUNS", True),
    }


# -- statistics ------------------------------------------------------------------------
def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of ``values``, linearly interpolated.

    >>> percentile([1, 2, 3, 4], 0.5)
    2.5
    >>> percentile([10.0], 0.99)
    10.0
    """
    if not values:
        raise ValueError("percentile() of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float], digits: int = 3) -> dict:
    """Count, min, p50, p90, p99 and max of ``values`` (``None`` figures when empty)."""
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "min": round(min(values), digits),
        "p50": round(percentile(values, 0.5), digits),
        "p90": round(percentile(values, 0.9), digits),
        "p99": round(percentile(values, 0.99), digits),
        "max": round(max(values), digits),
    }


def target(name: str, value: float | None, op: str, limit: float, unit: str = "") -> dict:
    """A target check: ``value op limit`` with ``op`` one of ``<=`` and ``>=``.

    A missing value (nothing could be measured) fails the check.

    >>> target("p99", 12.0, "<=", 50, "ms")["passed"]
    True
    >>> target("ratio", 0.9, ">=", 0.95)["passed"]
    False
    """
    if op not in ("<=", ">="):
        raise ValueError(f"unknown comparison {op!r}")
    passed = value is not None and (value <= limit if op == "<=" else value >= limit)
    return {"name": name, "value": value, "op": op, "limit": limit, "unit": unit, "passed": passed}


def fmt(value, digits: int = 1) -> str:
    """A figure for a Markdown table: thousands separated, ``n/a`` when missing.

    >>> fmt(1234.567), fmt(7, 0), fmt(None)
    ('1,234.6', '7', 'n/a')
    """
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def target_cell(result: dict, name: str) -> str:
    """The target ``name`` of a result as a Markdown cell: its limit and pass or fail.

    >>> target_cell({"targets": [target("p99", 12.0, "<=", 50, "ms")]}, "p99")
    '<= 50 ms: **pass**'
    """
    check = next(c for c in result["targets"] if c["name"] == name)
    return (
        f"{check['op']} {fmt(float(check['limit']), 2).rstrip('0').rstrip('.')} {check['unit']}: "
        + ("**pass**" if check["passed"] else "**FAIL**")
    )


# -- results ---------------------------------------------------------------------------
def write_result(name: str, payload: dict, output_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``<output_dir>/<name>.json`` (``benchmarks/results`` by default)."""
    folder = Path(output_dir) if output_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def result_payload(
    name: str,
    *,
    description: str,
    quick: bool,
    parameters: dict,
    results: dict,
    targets: list[dict],
    notes: list[str],
    started: float,
    environment_before: dict,
    worker_log: dict,
) -> dict:
    """The JSON document of one benchmark run (every benchmark writes this shape)."""
    env = dict(environment_before)
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if worker_log["warnings"] or worker_log["errors"] or worker_log["redelivered"]:
        notes = [
            *notes,
            f"The worker logged {worker_log['warnings']} warnings and {worker_log['errors']}"
            f" errors, and received {worker_log['redelivered']} task messages more than once"
            " (see worker_log): figures taken while it struggled describe the machine.",
        ]
    return {
        "benchmark": name,
        "description": description,
        "quick": quick,
        "parameters": parameters,
        "environment": env,
        "results": results,
        "targets": targets,
        "passed": all(check["passed"] for check in targets),
        "notes": notes,
        "worker_log": worker_log,
        "duration_s": round(time.monotonic() - started, 1),
    }


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Print ``rows`` under ``headers`` as an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for number, row in enumerate(cells):
        print(
            "  " + "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
        )
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))


def print_targets(payload: dict) -> None:
    """Print each target check of a result with PASS or FAIL, and worker log problems."""
    problems = payload["worker_log"]
    if problems["warnings"] or problems["errors"] or problems["redelivered"]:
        print(
            f"  worker log: {problems['warnings']} warnings, {problems['errors']} errors,"
            f" {problems['redelivered']} messages redelivered; e.g."
        )
        for example in problems["examples"][:3]:
            print(f"    {example}")
    for check in payload["targets"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        value = _cell(check["value"])
        print(
            f"  {verdict}  {check['name']}: {value} {check['op']} {check['limit']} {check['unit']}"
        )


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes (``--quick``, ``--output-dir``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help=f"where to write JSON (default {RESULTS_DIR})"
    )
    return parser


# -- markers ---------------------------------------------------------------------------
def redis_client():
    """This process's Redis client on the project's ``REDIS_URL`` (markers, server facts).

    One per process (a new one after a fork), so a marker costs a ``SET``, not a connect.
    """
    import redis
    from django.conf import settings

    client = _redis_clients.get(os.getpid())
    if client is None:
        client = _redis_clients[os.getpid()] = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5
        )
    return client


def _marker_key(task_id: str, what: str) -> str:
    return f"benchmarks:{task_id}:{what}"


def mark(task_id: str, what: str, **data) -> None:
    """Record (in the worker) that ``task_id`` reached ``what``, with ``data``."""
    data.setdefault("pid", os.getpid())
    redis_client().set(_marker_key(task_id, what), json.dumps(data), ex=MARKER_TTL)


def read_mark(client, task_id: str, what: str) -> dict | None:
    """The data of a marker, or ``None`` while it is not set."""
    raw = client.get(_marker_key(task_id, what))
    return None if raw is None else json.loads(raw)


def wait_for_mark(
    client, task_id: str, what: str, *, timeout: float = 30.0, interval: float = 0.001
) -> dict:
    """Poll until the marker is set; raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = read_mark(client, task_id, what)
        if data is not None:
            return data
        time.sleep(interval)
    raise TimeoutError(f"task {task_id} did not reach {what!r} within {timeout}s")


def poll(condition: Callable[[], object], *, timeout: float, interval: float = 0.001):
    """Call ``condition`` until it returns something truthy; return it, or ``None`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(interval)


def delete_records(task_ids: Sequence[str], batch: int = 1000) -> None:
    """Delete the signal rows and run records the benchmark left for ``task_ids``."""
    from tasksignal.models import CeleryTaskSignal, TaskRun

    ids = list(task_ids)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        CeleryTaskSignal.objects.filter(task_id__in=chunk).delete()
        TaskRun.objects.filter(task_id__in=chunk).delete()
