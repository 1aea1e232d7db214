"""Fixtures shared by the template tests: hook modules, a cache of baked projects, tools."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from template_options import DEFAULT_ANSWERS, REPO_ROOT

HOOKS_DIR = REPO_ROOT / "hooks"


def pytest_configure(config: pytest.Config) -> None:
    """Bake from this repository whatever directory pytest was started in."""
    if config.option.template == ".":
        config.option.template = str(REPO_ROOT)


def load_hook(name: str) -> ModuleType:
    """Import the raw (unrendered) hook ``hooks/<name>.py`` as a module, by path."""
    path = HOOKS_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hook_{name}", path)
    assert spec is not None, f"cannot load {path}"
    assert spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pre_gen() -> ModuleType:
    """The pre-generation hook, imported from its raw file."""
    return load_hook("pre_gen_project")


@pytest.fixture(scope="session")
def post_gen() -> ModuleType:
    """The post-generation hook, imported from its raw file."""
    return load_hook("post_gen_project")


def tool(name: str) -> str:
    """Return the path of a command-line tool installed beside the running Python, or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: run `make test` (it installs tests/requirements.txt)"
        )
    return found


@dataclass(frozen=True)
class Bake:
    """One bake of the template: the answers, and the project folder or the failure."""

    answers: Mapping[str, str]
    path: Path | None
    exit_code: int
    error: str

    @property
    def project(self) -> Path:
        """The baked project's folder; fails the test when the bake itself failed."""
        if self.path is None:
            pytest.fail(f"baking {dict(self.answers)} failed (exit {self.exit_code}): {self.error}")
        return self.path

    def has(self, relative: str) -> bool:
        """Whether the baked project contains ``relative`` (a file or a folder)."""
        return (self.project / relative).exists()


@pytest.fixture(scope="session")
def bake(cookies_session) -> Callable[[Mapping[str, str]], Bake]:
    """Return a function that bakes an option set once per session and reuses the result.

    Tests must treat the baked folders as read-only: tests that install or run a project copy
    it first.
    """
    cache: dict[tuple[tuple[str, str], ...], Bake] = {}

    def bake_once(extra_context: Mapping[str, str]) -> Bake:
        key = tuple(sorted(extra_context.items()))
        if key not in cache:
            result = cookies_session.bake(extra_context=dict(extra_context))
            cache[key] = Bake(
                answers=DEFAULT_ANSWERS | dict(extra_context),
                path=result.project_path if result.exception is None else None,
                exit_code=result.exit_code,
                error=repr(result.exception),
            )
        return cache[key]

    return bake_once
