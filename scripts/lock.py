"""Make the lock files the template ships: one pair per set of answers that changes them.

A baked project installs from ``requirements.txt`` (what the image runs) and
``requirements-dev.txt`` (that plus the dev tools, at the same versions), both pinned by hash.
Bakes must stay offline, so the template carries every pair, made here, and the post-generation
hook keeps the one its answers call for (``hooks/post_gen_project.py``, ``lock_key``).

For each set (Django release x Flower x Sentry x demo app) this bakes the template without its
hooks, puts the pair already in the template beside the bake (so that every pin that still
fits the ranges is kept), runs the baked project's own ``make lock`` with this machine's uv,
and copies the pair back into ``{{cookiecutter.project_slug}}/.locks/<key>/``. It also writes
``.locks/inputs.json``: the dependency declarations each pair was made from, which
``tests/test_lock_files.py`` compares with fresh bakes, offline, to prove every pair current.

    python scripts/lock.py             # after editing the generated pyproject.toml
    python scripts/lock.py --upgrade   # newest releases the ranges admit, for every set
    python scripts/lock.py --check     # offline: exit 1, naming them, if any set is stale

It needs the network (the package index) except with ``--check``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
PROJECT_TEMPLATE: Final = REPO_ROOT / "{{cookiecutter.project_slug}}"
INPUTS_FILE: Final = "inputs.json"


def post_gen_hook() -> ModuleType:
    """The post-generation hook, imported from its raw file (it names the sets and files)."""
    path = REPO_ROOT / "hooks" / "post_gen_project.py"
    spec = importlib.util.spec_from_file_location("post_gen_project", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


HOOK: Final = post_gen_hook()
STORE: Final = PROJECT_TEMPLATE / HOOK.LOCK_STORE


def lock_answer_sets() -> Iterator[dict[str, str]]:
    """Every combination of the answers that change the lock files."""
    options = json.loads((REPO_ROOT / "cookiecutter.json").read_text(encoding="utf-8"))
    choices = [
        options[name] if isinstance(options[name], list) else ["y", "n"]
        for name in HOOK.LOCK_OPTIONS
    ]
    for values in itertools.product(*choices):
        yield dict(zip(HOOK.LOCK_OPTIONS, values, strict=True))


def dependency_inputs(pyproject: Path) -> dict[str, Any]:
    """What a lock pair is made from: ``requires-python`` and every dependency list."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }


def bake_without_hooks(answers: Mapping[str, str], output_dir: Path) -> Path:
    """Render the project template for ``answers`` (no hooks: nothing is removed or locked)."""
    from cookiecutter.main import cookiecutter  # noqa: PLC0415 - only this script bakes

    context = dict(answers)
    if context["django_version"] == "6.1":
        context["python_version"] = "3.12"  # any Python that Django release runs on
    output_dir.mkdir(parents=True, exist_ok=True)
    config = output_dir / "config.yaml"
    config.write_text(
        f"cookiecutters_dir: {json.dumps(str(output_dir / 'cc'))}\n"
        f"replay_dir: {json.dumps(str(output_dir / 'replay'))}\n",
        encoding="utf-8",
    )
    return Path(
        cookiecutter(
            str(REPO_ROOT),
            no_input=True,
            extra_context=context,
            output_dir=str(output_dir / "bake"),
            config_file=str(config),
            accept_hooks=False,
        )
    )


def read_inputs() -> dict[str, Any]:
    """The recorded inputs of every pair, by key (empty before the first run)."""
    path = STORE / INPUTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def uv_binary() -> str:
    """The uv installed beside the running Python (tests/requirements.txt), else on PATH."""
    try:
        from uv import find_uv_bin  # noqa: PLC0415 - the uv package is optional here
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise SystemExit("uv is needed: run `make test-fast` once, or install uv") from None
        return found
    return find_uv_bin()


def lock_one(answers: Mapping[str, str], *, upgrade: bool, work: Path) -> dict[str, Any]:
    """Make the pair for ``answers`` in the template's store; return its inputs."""
    key = HOOK.lock_key(answers)
    project = bake_without_hooks(answers, work / key)
    shutil.rmtree(project / HOOK.LOCK_STORE, ignore_errors=True)
    target = STORE / key
    if not upgrade:
        for name in HOOK.LOCK_FILES:
            if (target / name).is_file():
                shutil.copyfile(target / name, project / name)
    command = ["make", "--no-print-directory", "lock", f"UV={uv_binary()}"]
    if upgrade:
        command.append("LOCK_ARGS=--upgrade")
    environment = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    subprocess.run(command, cwd=project, check=True, env=environment, timeout=600)
    target.mkdir(parents=True, exist_ok=True)
    for name in HOOK.LOCK_FILES:
        shutil.copyfile(project / name, target / name)
    return dependency_inputs(project / "pyproject.toml")


def stale_keys(work: Path) -> list[str]:
    """Keys whose pair is missing or was made from other dependency declarations (offline)."""
    recorded = read_inputs()
    stale = []
    for answers in lock_answer_sets():
        key = HOOK.lock_key(answers)
        project = bake_without_hooks(answers, work / key)
        files_present = all((STORE / key / name).is_file() for name in HOOK.LOCK_FILES)
        if not files_present or recorded.get(key) != dependency_inputs(project / "pyproject.toml"):
            stale.append(key)
    return stale


def main(argv: list[str] | None = None) -> int:
    """Make (or check) every lock pair; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrade", action="store_true", help="ignore the current pins")
    parser.add_argument("--check", action="store_true", help="only report stale pairs")
    parser.add_argument("--only", metavar="KEY", action="append", help="only this set")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tasksignal-lock-") as folder:
        work = Path(folder)
        if arguments.check:
            stale = stale_keys(work)
            for key in stale:
                print(f"stale: {key} (run scripts/lock.py)", file=sys.stderr)
            return 1 if stale else 0
        inputs = read_inputs()
        wanted = set(arguments.only or [])
        for answers in lock_answer_sets():
            key = HOOK.lock_key(answers)
            if wanted and key not in wanted:
                continue
            print(f"lock: {key}", flush=True)
            inputs[key] = lock_one(answers, upgrade=arguments.upgrade, work=work)
        known = {HOOK.lock_key(answers) for answers in lock_answer_sets()}
        for leftover in sorted(path for path in STORE.iterdir() if path.is_dir()):
            if leftover.name not in known:
                shutil.rmtree(leftover)
        (STORE / INPUTS_FILE).write_text(
            json.dumps({key: inputs[key] for key in sorted(inputs) if key in known}, indent=2)
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
