"""The template's options, the combinations the tests bake, and what each bake must contain."""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Final

from allpairspy import AllPairs

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
COOKIECUTTER_JSON: Final = json.loads(
    (REPO_ROOT / "cookiecutter.json").read_text(encoding="utf-8"),
)

#: The options with a fixed set of answers, each with every answer it accepts, default first.
CHOICE_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    name: tuple(value) if isinstance(value, list) else ("y", "n") if value == "y" else ("n", "y")
    for name, value in COOKIECUTTER_JSON.items()
    if not name.startswith("_") and (isinstance(value, list) or value in ("y", "n"))
}

#: Every answer of a default bake (``project_slug`` rendered from the default name).
DEFAULT_ANSWERS: Final[dict[str, str]] = {
    name: values[0] for name, values in CHOICE_OPTIONS.items()
} | {
    name: value
    for name, value in COOKIECUTTER_JSON.items()
    if isinstance(value, str) and not name.startswith("_") and name not in CHOICE_OPTIONS
}
DEFAULT_ANSWERS["project_slug"] = (
    DEFAULT_ANSWERS["project_name"].lower().strip().replace(" ", "_").replace("-", "_")
)


def _load_pre_gen_hook() -> ModuleType:
    """The pre-generation hook, imported by path: it owns the rule of which answers go together."""
    path = REPO_ROOT / "hooks" / "pre_gen_project.py"
    spec = importlib.util.spec_from_file_location("template_options_pre_gen", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PRE_GEN: Final = _load_pre_gen_hook()


def is_possible(answers: Mapping[str, str]) -> bool:
    """Whether the answers can go together (the pre-generation hook's own rule).

    >>> is_possible({"django_version": "6.1", "python_version": "3.11"})
    False
    """
    return _PRE_GEN.combination_problem(answers) is None


def _possible_row(row: list[str]) -> bool:
    """The filter for allpairspy: a partial row (options in order) that breaks no rule."""
    return is_possible(dict(zip(CHOICE_OPTIONS, row, strict=False)))


def pairwise_cases() -> list[dict[str, str]]:
    """Return option sets in which every pair of answers of two options appears at least once.

    allpairspy is deterministic for a given option order, so every run (and every xdist
    worker) collects the same cases.
    """
    names = list(CHOICE_OPTIONS)
    cases = [
        dict(zip(names, row, strict=True))
        for row in AllPairs(
            [list(CHOICE_OPTIONS[name]) for name in names], filter_func=_possible_row
        )
    ]
    # With a filter, allpairspy can leave a few possible pairs out: one more case for each.
    for first, a, second, b in uncovered_pairs(cases):
        if not any(case[first] == a and case[second] == b for case in cases):
            cases.append(_possible_case({first: a, second: b}))
    return cases


def _possible_case(fixed: Mapping[str, str]) -> dict[str, str]:
    """The default choices with ``fixed`` applied, other answers changed until possible."""
    case = {name: values[0] for name, values in CHOICE_OPTIONS.items()} | dict(fixed)
    for name, values in CHOICE_OPTIONS.items():
        if is_possible(case):
            break
        if name not in fixed:
            case[name] = next(
                (value for value in values if is_possible(case | {name: value})), case[name]
            )
    return case


def uncovered_pairs(cases: list[Mapping[str, str]]) -> list[tuple[str, str, str, str]]:
    """Return each possible pair of (option, answer) x (option, answer) that no case contains."""
    missing = []
    for first, second in itertools.combinations(CHOICE_OPTIONS, 2):
        for a, b in itertools.product(CHOICE_OPTIONS[first], CHOICE_OPTIONS[second]):
            if not is_possible({first: a, second: b}):
                continue
            if not any(case[first] == a and case[second] == b for case in cases):
                missing.append((first, a, second, b))
    return missing


_SHORT_LICENSE: Final = {
    "MIT": "mit",
    "BSD-3-Clause": "bsd3",
    "Apache-2.0": "apache2",
    "Not open source": "closed",
}


def case_id(answers: Mapping[str, str]) -> str:
    """Return a readable test id for an option set, e.g. ``py3.12-pg17-docker-...-mit``.

    Each y/n option shows as its word or ``no`` + word, so every option is visible in the id.
    """
    full = DEFAULT_ANSWERS | dict(answers)
    words = [
        f"py{full['python_version']}",
        f"dj{full['django_version']}",
        f"pg{full['postgres_version']}",
    ]
    for option, word in (
        ("use_docker", "docker"),
        ("use_flower", "flower"),
        ("use_sentry", "sentry"),
        ("use_celery_beat", "beat"),
        ("include_demo_tasks", "demo"),
    ):
        words.append(word if full[option] == "y" else f"no{word}")
    words.append("github" if full["ci_tool"] == "github" else "noci")
    words.append(_SHORT_LICENSE.get(full["open_source_license"], full["open_source_license"]))
    return "-".join(words)


#: Paths every bake has, whatever the options.
ALWAYS_PRESENT: Final = (
    "README.md",
    "manage.py",
    "pyproject.toml",
    "Procfile",
    "Makefile",
    ".gitignore",
    ".env.example",
    ".env",
    ".pre-commit-config.yaml",
    "requirements.txt",
    "requirements-dev.txt",
    "config/__init__.py",
    "config/settings/__init__.py",
    "config/settings/base.py",
    "config/settings/local.py",
    "config/settings/production.py",
    "config/settings/test.py",
    "config/celery.py",
    "config/urls.py",
    "config/wsgi.py",
    "config/gunicorn.conf.py",
    "tasksignal/__init__.py",
    "tasksignal/apps.py",
    "tests",
    "bin/web",
    "bin/worker",
    "bin/migrate",
    "benchmarks",
)

#: Paths that exist exactly when an option has a given answer: (option, answer, paths).
PRESENT_WHEN: Final = (
    ("use_docker", "y", ("Dockerfile", "compose.yaml", ".dockerignore", "bin/compose-check")),
    ("use_flower", "y", ("bin/flower", "tests/test_flower.py")),
    ("use_sentry", "y", ("config/sentry.py", "tests/test_sentry.py")),
    ("use_celery_beat", "y", ("bin/beat", "tests/test_beat.py")),
    ("ci_tool", "github", (".github/workflows/ci.yml", ".github/dependabot.yml")),
    ("include_demo_tasks", "y", ("demo", "loadtest", "bin/loadtest", "docs/loadtest.md")),
)


def expected_presence(answers: Mapping[str, str]) -> dict[str, bool]:
    """Map each option-dependent path to whether a bake with ``answers`` must have it."""
    full = DEFAULT_ANSWERS | dict(answers)
    presence = {
        path: full[option] == answer for option, answer, paths in PRESENT_WHEN for path in paths
    }
    presence[".github"] = full["ci_tool"] != "none"
    presence["LICENSE"] = full["open_source_license"] != "Not open source"
    presence[".locks"] = False  # the post-generation hook keeps one pair and removes the store
    return presence


#: Files that run or build the project: none may point at a path the options removed.
WIRING_FILES: Final = (
    "Procfile",
    "Makefile",
    "compose.yaml",
    "Dockerfile",
    "pyproject.toml",
    ".github/workflows/ci.yml",
)


def removed_paths(answers: Mapping[str, str]) -> list[str]:
    """The option-dependent paths that a bake with ``answers`` must not have."""
    return sorted(path for path, wanted in expected_presence(answers).items() if not wanted)


#: Procfile process types each bake has, and those that follow an option.
ALWAYS_PROCESSES: Final = ("web", "worker")
PROCESS_WHEN: Final = (("beat", "use_celery_beat"), ("flower", "use_flower"))

#: A phrase each license text contains.
LICENSE_MARKERS: Final = {
    "MIT": "MIT License",
    "BSD-3-Clause": "Redistribution and use in source and binary forms",
    "Apache-2.0": "Apache License",
}
