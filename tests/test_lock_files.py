"""The lock files the template ships are current, and every bake gets the pair its answers need.

All offline, like the bakes: ``scripts/lock.py`` recorded, for each set of answers that
changes the dependencies, the declarations its pair was made from (``.locks/inputs.json``);
a fresh bake of that set must declare exactly the same, or the pair is stale (the equivalent
of ``uv lock --check``). Each pair must pin, for every Python its Django release runs on, a
version inside every range the bake's ``pyproject.toml`` asks for, every package with its
hashes, and ``requirements.txt`` exactly as ``requirements-dev.txt`` does. That the pins are
complete (nothing missing beneath the direct requirements) is proven where a pair is really
installed: the end-to-end tests run ``uv pip check`` after installing from them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import lock
import pytest
from conftest import Bake
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ANSWER_SETS = list(lock.lock_answer_sets())
KEYS = [lock.HOOK.lock_key(answers) for answers in ANSWER_SETS]
#: Pythons offered by the template: each pair must work on those its Django release allows.
PYTHONS = ("3.11", "3.12", "3.13")


@dataclass(frozen=True)
class Pin:
    """One package of a lock file: its version, the environments it applies to, its hashes."""

    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]


def read_pins(path: Path) -> dict[str, list[Pin]]:
    """The pins of a hash-pinned requirements file (``uv pip compile --generate-hashes``)."""
    pins: dict[str, list[Pin]] = {}
    current: tuple[str, Version, Marker | None] | None = None
    hashes: list[str] = []

    def flush() -> None:
        if current is not None:
            name, version, marker = current
            pins.setdefault(name, []).append(Pin(version, marker, tuple(hashes)))

    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip().removesuffix("\\").strip()
        if not text or text.startswith("#"):
            continue
        if line[0].isspace():
            hashes.append(text.removeprefix("--hash="))
            continue
        flush()
        requirement, _, marker = text.partition(";")
        name, equals, version = requirement.strip().partition("==")
        assert equals, f"{path.name}: not an exact pin: {line!r}"
        current = (canonicalize_name(name), Version(version), Marker(marker) if marker else None)
        hashes = []
    flush()
    return pins


def environment(python: str) -> dict[str, str]:
    """Marker variables of CPython ``python`` on Linux x86_64 (what the image and CI run)."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def pinned_version(pins: Mapping[str, list[Pin]], name: str, python: str) -> Version | None:
    """The version a lock installs of ``name`` on ``python``, or ``None`` if it installs none."""
    for pin in pins.get(canonicalize_name(name), []):
        if pin.marker is None or pin.marker.evaluate(environment(python)):
            return pin.version
    return None


def answers_for(key: str) -> dict[str, str]:
    """Bake answers for the lock set ``key`` (a Python its Django release runs on)."""
    answers = ANSWER_SETS[KEYS.index(key)]
    python = {"python_version": "3.12"} if answers["django_version"] == "6.1" else {}
    return dict(answers) | python


@pytest.fixture(params=KEYS)
def lock_set(request: pytest.FixtureRequest, bake: Callable[[Mapping[str, str]], Bake]) -> tuple:
    """A lock set: its key, a bake of its answers, and its pair in the template's store."""
    key = request.param
    return key, bake(answers_for(key)), lock.STORE / key


def test_every_answer_set_has_its_pair_and_nothing_else_is_stored() -> None:
    stored = sorted(path.name for path in lock.STORE.iterdir() if path.is_dir())
    assert stored == sorted(KEYS), "run scripts/lock.py: the store does not match the sets"
    for key in KEYS:
        for name in lock.HOOK.LOCK_FILES:
            assert (lock.STORE / key / name).is_file(), f"{key}/{name} is missing"


def test_each_pair_was_made_from_what_its_bake_declares(lock_set: tuple) -> None:
    key, baked, _ = lock_set
    recorded = lock.read_inputs().get(key)
    current = lock.dependency_inputs(baked.project / "pyproject.toml")
    assert recorded == current, (
        f"the lock files of {key} are stale: pyproject.toml changed since scripts/lock.py ran"
        f" (recorded {json.dumps(recorded)}, now {json.dumps(current)}); run scripts/lock.py"
    )


def test_pins_fit_every_range_on_every_python_the_django_release_runs_on(lock_set: tuple) -> None:
    key, baked, store = lock_set
    import tomllib  # noqa: PLC0415 - only this test reads TOML

    project = tomllib.loads((baked.project / "pyproject.toml").read_text(encoding="utf-8"))
    declared = project["project"]
    minimum = Version(declared["requires-python"].split(",")[0].removeprefix(">="))
    problems = []
    for name, extras in (("requirements.txt", ()), ("requirements-dev.txt", ("dev",))):
        pins = read_pins(store / name)
        requirements = [Requirement(text) for text in declared["dependencies"]]
        for extra in extras:
            requirements += [Requirement(text) for text in declared["optional-dependencies"][extra]]
        for python in (version for version in PYTHONS if Version(version) >= minimum):
            for requirement in requirements:
                if requirement.marker and not requirement.marker.evaluate(environment(python)):
                    continue
                version = pinned_version(pins, requirement.name, python)
                if version is None or version not in requirement.specifier:
                    problems.append(f"{name} on {python}: {requirement} pinned as {version}")
        unhashed = [
            package for package, entries in pins.items() if not all(pin.hashes for pin in entries)
        ]
        problems += [f"{name}: {package} has no hash" for package in unhashed]
    assert not problems, f"{key}: " + "; ".join(problems)


def test_runtime_pins_are_the_dev_pins(lock_set: tuple) -> None:
    key, _, store = lock_set
    runtime, dev = read_pins(store / "requirements.txt"), read_pins(store / "requirements-dev.txt")
    differ = [name for name, pins in runtime.items() if dev.get(name) != pins]
    assert not differ, f"{key}: requirements.txt and requirements-dev.txt pin {differ} apart"


def test_lock_files_name_no_index_or_url() -> None:
    # They must install from whatever index or mirror a team uses, and reveal none.
    pattern = re.compile(r"--(?:extra-)?index-url|--find-links|://|file:")
    offenders = [
        f"{path.relative_to(lock.STORE)}:{number}"
        for path in sorted(lock.STORE.glob("*/*.txt"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not offenders, f"lock files name an index or a URL: {offenders[:10]}"


def test_the_django_pin_is_the_release_chosen(lock_set: tuple) -> None:
    key, baked, store = lock_set
    version = pinned_version(read_pins(store / "requirements.txt"), "django", "3.12")
    assert version is not None, f"{key}: requirements.txt installs no Django"
    chosen = baked.answers["django_version"]
    assert f"{version.major}.{version.minor}" == chosen, f"{key}: Django {version}, not {chosen}"
