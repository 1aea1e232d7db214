"""The pre-generation hook's validators, called directly on the raw hook module."""

from __future__ import annotations

import ast
import doctest
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from cookiecutter.environment import StrictEnvironment
from template_options import CHOICE_OPTIONS, COOKIECUTTER_JSON, DEFAULT_ANSWERS, REPO_ROOT

HOOK_PATH = REPO_ROOT / "hooks" / "pre_gen_project.py"

GOOD = [
    ("project_name", "Task Signal Service"),
    ("project_name", "Émile's Tasks"),
    ("project_slug", "task_signal_service"),
    ("project_slug", "billing2"),
    ("project_slug", "a" * 50),
    ("description", ""),
    ("description", "Cancels, pauses & resumes <tasks>: 100% safe."),
    ("author_name", "Zoë O'Brien"),
    ("email", "you@example.com"),
    ("email", "first.last+tasks@mail.example.co.uk"),
    ("domain_name", "example.com"),
    ("domain_name", "api.my-company.co.uk"),
    ("timezone", "UTC"),
    ("timezone", "Europe/Berlin"),
    ("timezone", "America/Argentina/Buenos_Aires"),
    ("python_version", "3.11"),
    ("python_version", "3.13"),
    ("django_version", "6.1"),
    ("django_version", "5.2"),
    ("postgres_version", "15"),
    ("use_docker", "y"),
    ("use_flower", "n"),
    ("ci_tool", "none"),
    ("open_source_license", "Not open source"),
]

BAD = [
    ("project_name", "", "must not be empty"),
    ("project_name", "tab\there", "single line"),
    ("project_name", "back\\slash", "backslashes"),
    ("project_name", "x" * 101, "at most 100"),
    ("project_slug", "Bad-Slug", "lowercase Python identifier"),
    ("project_slug", "9lives", "lowercase Python identifier"),
    ("project_slug", "", "lowercase Python identifier"),
    ("project_slug", "import", "keyword"),
    ("project_slug", "case", "keyword"),
    ("project_slug", "celery", "shadow a package"),
    ("project_slug", "tasksignal", "shadow a package"),
    ("project_slug", "json", "standard-library module"),
    ("project_slug", "a" * 51, "at most 50"),
    ("description", "a\nb", "single line"),
    ("author_name", " ", "must not be empty"),
    ("email", "you", "e-mail address"),
    ("email", "you@example", "e-mail address"),
    ("email", "you @example.com", "e-mail address"),
    ("domain_name", "example.com:8000", "bare lowercase domain"),
    ("domain_name", "exa_mple.com", "bare lowercase domain"),
    ("domain_name", "example.c", "bare lowercase domain"),
    ("timezone", "Europe/Atlantis", "IANA time-zone"),
    ("timezone", "", "IANA time-zone"),
    ("python_version", "3.9", "'3.11', '3.12', '3.13'"),
    ("django_version", "5.1", "'6.1', '5.2'"),
    ("django_version", "6", "'6.1', '5.2'"),
    ("use_sentry", "yes", "'y' or 'n'"),
    ("postgres_version", "18", "'15', '16', '17'"),
    ("use_celery_beat", "N", "'y' or 'n'"),
    ("ci_tool", "GitHub", "'github', 'none'"),
    ("open_source_license", "mit", "'MIT'"),
]


def test_docstring_examples_hold(pre_gen: ModuleType) -> None:
    results = doctest.testmod(pre_gen, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0, "the hook's docstrings have no examples"
    assert results.failed == 0, f"{results.failed} docstring examples of the hook fail"


@pytest.mark.parametrize(("answer", "value"), GOOD, ids=[f"{a}={v!r}"[:50] for a, v in GOOD])
def test_validator_accepts_a_good_answer(pre_gen: ModuleType, answer: str, value: str) -> None:
    problem = pre_gen.VALIDATORS[answer](value)
    assert problem is None, f"{answer}={value!r} was rejected: {problem}"


@pytest.mark.parametrize(
    ("answer", "value", "reason"), BAD, ids=[f"{a}={v!r}"[:50] for a, v, _ in BAD]
)
def test_validator_rejects_a_bad_answer_saying_why(
    pre_gen: ModuleType, answer: str, value: str, reason: str
) -> None:
    problem = pre_gen.VALIDATORS[answer](value)
    assert problem is not None, f"{answer}={value!r} was accepted"
    assert reason in problem, f"the reason for rejecting {answer}={value!r} is unclear: {problem}"


def test_every_question_has_a_validator(pre_gen: ModuleType) -> None:
    questions = [name for name in COOKIECUTTER_JSON if not name.startswith("_")]
    assert list(pre_gen.VALIDATORS) == questions, (
        "VALIDATORS must list every question of cookiecutter.json, in its order"
    )


@pytest.mark.parametrize("option", sorted(CHOICE_OPTIONS))
def test_validator_accepts_exactly_the_choices_of_cookiecutter_json(
    pre_gen: ModuleType, option: str
) -> None:
    validate = pre_gen.VALIDATORS[option]
    for choice in CHOICE_OPTIONS[option]:
        assert validate(choice) is None, f"{option}={choice!r} is offered but rejected"


def test_default_answers_are_all_valid(pre_gen: ModuleType) -> None:
    assert pre_gen.first_error(DEFAULT_ANSWERS) is None


def test_first_error_reports_the_first_bad_answer_in_question_order(pre_gen: ModuleType) -> None:
    answers = DEFAULT_ANSWERS | {"use_docker": "maybe", "email": "nope"}
    error = pre_gen.first_error(answers)
    assert error is not None, "two bad answers were accepted"
    assert error.startswith("ERROR: email 'nope' "), f"expected the email error first: {error}"
    assert "\n" not in error, "the error must be one line"


def test_validators_never_use_assert() -> None:
    tree = ast.parse(HOOK_PATH.read_text(encoding="utf-8"))
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not asserts, f"validation by assert vanishes under python -O (lines {asserts})"


def _template_lines_outside_main(path: Path) -> list[int]:
    source = path.read_text(encoding="utf-8")
    main = next(
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name == "main"
    )
    return [
        number
        for number, line in enumerate(source.splitlines(), start=1)
        if any(marker in line for marker in ("{{", "{%", "{#"))
        and not main.lineno <= number <= (main.end_lineno or main.lineno)
    ]


@pytest.mark.parametrize("hook", ["pre_gen_project", "post_gen_project"])
def test_hook_keeps_template_syntax_inside_main(hook: str) -> None:
    outside = _template_lines_outside_main(REPO_ROOT / "hooks" / f"{hook}.py")
    assert not outside, f"{hook}.py has Jinja syntax outside main() on lines {outside}"


def _render_hook(tmp_path: Path, answers: dict[str, str]) -> Path:
    """Render the hook with Jinja as cookiecutter does, into ``tmp_path``."""
    environment = StrictEnvironment(context={"cookiecutter": answers}, keep_trailing_newline=True)
    template = environment.from_string(HOOK_PATH.read_text(encoding="utf-8"))
    rendered = tmp_path / "pre_gen_project.py"
    rendered.write_text(template.render(cookiecutter=answers), encoding="utf-8")
    return rendered


def _run(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=False, timeout=60
    )


def test_rendered_hook_round_trips_quotes_backslashes_and_unicode(tmp_path: Path) -> None:
    answers = DEFAULT_ANSWERS | {
        "project_name": "Zoë's 'Task' Service",
        "author_name": "O'Brien & Sons <dev>",
        "description": "Triple quotes ''' and \"\"\" and a \\ backslash",
    }
    result = _run(_render_hook(tmp_path, answers))
    # The description is rejected (double quotes); what matters is that the rendered hook ran
    # and reported the description intact, which proves every answer survived the rendering.
    exit_code = result.returncode
    assert exit_code == 1, f"rendered hook failed to run: {result.stderr}"
    assert result.stderr.strip() == (
        f'ERROR: description {answers["description"]!r} must not contain double quotes (")'
        " or backslashes (\\)"
    ), f"unexpected message: {result.stderr!r}"


def test_rendered_hook_exits_zero_for_default_answers(tmp_path: Path) -> None:
    result = _run(_render_hook(tmp_path, dict(DEFAULT_ANSWERS)))
    exit_code = result.returncode
    assert exit_code == 0, f"the default answers were rejected: {result.stderr}"
    assert result.stderr == "", f"a successful validation printed: {result.stderr!r}"


def test_rendered_hook_prints_one_line_and_exits_one_for_a_bad_answer(tmp_path: Path) -> None:
    result = _run(_render_hook(tmp_path, DEFAULT_ANSWERS | {"project_slug": "Bad-Slug"}))
    exit_code = result.returncode
    assert exit_code == 1, f"Bad-Slug gave exit {result.returncode}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("ERROR: project_slug 'Bad-Slug' must be a lowercase"), lines[0]


def test_main_renders_every_validated_answer() -> None:
    source = HOOK_PATH.read_text(encoding="utf-8")
    rendered = re.findall(r'"(\w+)": "\{\{ cookiecutter\.\1 \| urlencode \}\}"', source)
    questions = [name for name in COOKIECUTTER_JSON if not name.startswith("_")]
    assert rendered == questions, "main() must render every question, in cookiecutter.json order"


@pytest.mark.parametrize(
    ("django", "python", "possible"),
    [("6.1", "3.11", False), ("6.1", "3.12", True), ("6.1", "3.13", True), ("5.2", "3.11", True)],
)
def test_combination_rule_knows_which_django_runs_on_which_python(
    pre_gen: ModuleType, django: str, python: str, possible: bool
) -> None:
    problem = pre_gen.combination_problem({"django_version": django, "python_version": python})
    assert (problem is None) == possible, f"Django {django} on Python {python}: {problem}"
    if problem is not None:
        assert "\n" not in problem, "the error must be one line"
        assert problem.startswith(f"ERROR: django_version '{django}' needs Python "), problem


def test_version_comparison_is_numeric_not_textual(pre_gen: ModuleType) -> None:
    # As strings "3.9" > "3.12"; as versions it is older.
    assert pre_gen._version("3.9") < pre_gen._version("3.12")


def test_first_error_reports_an_impossible_combination_after_single_answers(
    pre_gen: ModuleType,
) -> None:
    answers = DEFAULT_ANSWERS | {"django_version": "6.1", "python_version": "3.11"}
    error = pre_gen.first_error(answers)
    assert error is not None, "Django 6.1 on Python 3.11 was accepted"
    assert error.startswith("ERROR: django_version '6.1' needs Python 3.12"), error
    bad_slug = pre_gen.first_error(answers | {"project_slug": "Bad-Slug"})
    assert bad_slug is not None, "a bad slug was accepted"
    assert bad_slug.startswith("ERROR: project_slug"), "single answers must be reported first"
