"""A bake with a bad answer stops before generating anything and names the bad answer.

Free-text and y/n answers reach the pre-generation hook straight from ``extra_context``.
Cookiecutter itself refuses an unknown answer to a choice option given that way, so the hook's
own check of choice answers is exercised through a replay file, the one route by which any
answer reaches the hook unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cookiecutter.exceptions import FailedHookException
from cookiecutter.main import cookiecutter
from template_options import COOKIECUTTER_JSON, DEFAULT_ANSWERS, REPO_ROOT

#: (answer, bad value) pairs given through extra_context; each must be rejected by the hook.
BAD_ANSWERS = [
    ("project_name", ""),
    ("project_name", "   "),
    ("project_name", "Two\nLines"),
    ("project_name", 'The "Best" Service'),
    ("project_name", "x" * 101),
    ("project_slug", "Bad-Slug"),
    ("project_slug", "1st_service"),
    ("project_slug", "_private"),
    ("project_slug", "class"),
    ("project_slug", "match"),
    ("project_slug", "django"),
    ("project_slug", "celery"),
    ("project_slug", "kombu"),
    ("project_slug", "redis"),
    ("project_slug", "psycopg"),
    ("project_slug", "gunicorn"),
    ("project_slug", "config"),
    ("project_slug", "tasksignal"),
    ("project_slug", "demo"),
    ("project_slug", "test"),
    ("project_slug", "tests"),
    ("project_slug", "locust"),
    ("project_slug", "environ"),
    ("project_slug", "whitenoise"),
    ("project_slug", "email"),
    ("project_slug", "a" * 51),
    ("description", "line one\nline two"),
    ("description", 'say "hi"'),
    ("description", "d" * 301),
    ("author_name", ""),
    ("author_name", "Back\\slash"),
    ("email", "you.example.com"),
    ("email", "you@localhost"),
    ("email", "you@@example.com"),
    ("domain_name", "https://example.com"),
    ("domain_name", "example.com/path"),
    ("domain_name", "localhost"),
    ("domain_name", "Example.COM"),
    ("domain_name", "-bad.example.com"),
    ("timezone", "Mars/Olympus_Mons"),
    ("timezone", "utc"),
    ("timezone", "../../etc/passwd"),
    ("use_docker", "yes"),
    ("use_flower", "Y"),
    ("use_celery_beat", "true"),
    ("include_demo_tasks", ""),
]

#: Bad answers to choice options: only a replay file can carry them to the hook.
BAD_CHOICES = [
    ("python_version", "3.10"),
    ("python_version", "3.14"),
    ("postgres_version", "14"),
    ("django_version", "5.1"),
    ("ci_tool", "gitlab"),
    ("open_source_license", "GPL-3.0"),
]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR:")]


def _assert_rejected_naming(stderr: str, answer: str, value: str) -> None:
    errors = _error_lines(stderr)
    assert len(errors) == 1, f"expected exactly one ERROR line on stderr, got: {stderr!r}"
    assert errors[0].startswith(f"ERROR: {answer} {value!r} "), (
        f"the error does not name {answer}={value!r}: {errors[0]!r}"
    )


@pytest.mark.parametrize(
    ("answer", "value"), BAD_ANSWERS, ids=[f"{a}={v!r}"[:60] for a, v in BAD_ANSWERS]
)
def test_bad_answer_stops_the_bake_and_is_named(
    cookies,
    capfd: pytest.CaptureFixture[str],
    answer: str,
    value: str,
) -> None:
    # A bad name would also make a bad slug, and an empty slug stops cookiecutter before the
    # hook runs; pin a good slug so the name alone is on trial.
    pinned = {"project_slug": "valid_slug"} if answer == "project_name" else {}
    result = cookies.bake(extra_context=pinned | {answer: value})
    stderr = capfd.readouterr().err
    assert result.exit_code != 0, f"{answer}={value!r} was accepted"
    assert isinstance(result.exception, FailedHookException), (
        f"expected the pre-generation hook to stop the bake, got {result.exception!r}"
    )
    _assert_rejected_naming(stderr, answer, value)


def test_name_that_makes_a_bad_slug_is_rejected_naming_the_slug(
    cookies,
    capfd: pytest.CaptureFixture[str],
) -> None:
    result = cookies.bake(extra_context={"project_name": "Ünïcode App!"})
    stderr = capfd.readouterr().err
    assert result.exit_code != 0, "a name whose derived slug is invalid was accepted"
    _assert_rejected_naming(stderr, "project_slug", "ünïcode_app!")


def test_rejected_bake_leaves_no_project_behind(tmp_path: Path) -> None:
    _, config = _replay(tmp_path, DEFAULT_ANSWERS)
    output = tmp_path / "out"
    with pytest.raises(FailedHookException):
        cookiecutter(
            str(REPO_ROOT),
            no_input=True,
            extra_context={"project_slug": "Bad-Slug"},
            output_dir=str(output),
            config_file=str(config),
        )
    leftovers = sorted(output.glob("*"))
    assert not leftovers, f"a rejected bake left files behind: {leftovers}"


@pytest.mark.parametrize(("answer", "value"), BAD_CHOICES, ids=[f"{a}={v}" for a, v in BAD_CHOICES])
def test_cookiecutter_refuses_an_unknown_choice_naming_the_option(
    cookies,
    answer: str,
    value: str,
) -> None:
    result = cookies.bake(extra_context={answer: value})
    assert result.exit_code != 0, f"{answer}={value!r} was accepted"
    assert answer in str(result.exception), (
        f"the failure does not name {answer}: {result.exception!r}"
    )


def _replay(tmp_path: Path, answers: dict[str, str]) -> tuple[Path, Path]:
    """Write a replay file with ``answers`` and a private cookiecutter config; return both."""
    replay_file = tmp_path / "replay" / "answers.json"
    replay_file.parent.mkdir()
    context = {
        name: value for name, value in COOKIECUTTER_JSON.items() if name.startswith("__")
    } | answers
    replay_file.write_text(json.dumps({"cookiecutter": context}), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"cookiecutters_dir: {json.dumps(str(tmp_path / 'cookiecutters'))}\n"
        f"replay_dir: {json.dumps(str(tmp_path / 'replays'))}\n",
        encoding="utf-8",
    )
    return replay_file, config


@pytest.mark.parametrize(
    ("answer", "value"),
    [*BAD_CHOICES, ("use_docker", "yes")],
    ids=[f"{a}={v}" for a, v in [*BAD_CHOICES, ("use_docker", "yes")]],
)
def test_hook_rejects_a_bad_choice_that_bypasses_cookiecutter(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    answer: str,
    value: str,
) -> None:
    replay_file, config = _replay(tmp_path, DEFAULT_ANSWERS | {answer: value})
    output = tmp_path / "out"
    with pytest.raises(FailedHookException):
        cookiecutter(
            str(REPO_ROOT), replay=str(replay_file), output_dir=str(output), config_file=str(config)
        )
    _assert_rejected_naming(capfd.readouterr().err, answer, value)
    assert not list(output.glob("*")), "a rejected bake left files behind"


def test_django_61_on_python_311_fails_the_bake_with_one_line(
    cookies,
    capfd: pytest.CaptureFixture[str],
) -> None:
    result = cookies.bake(extra_context={"django_version": "6.1", "python_version": "3.11"})
    stderr = capfd.readouterr().err
    assert result.exit_code != 0, "Django 6.1 on Python 3.11 was baked"
    assert isinstance(result.exception, FailedHookException), repr(result.exception)
    errors = _error_lines(stderr)
    assert errors == [
        "ERROR: django_version '6.1' needs Python 3.12 or newer, but python_version is '3.11':"
        " choose django_version 5.2 or python_version 3.12+"
    ], stderr
