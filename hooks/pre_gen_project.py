"""Validate the answers to the template's questions before anything is generated.

Cookiecutter renders this file with Jinja and runs it before it writes a single file. The
answers are rendered only into the dictionary built in ``main()``, so the raw file stays a
plain Python module that tests import by path and call validator by validator.

Each answer has one validator. A validator returns ``None`` for a good answer and, for a bad
one, a phrase that completes the sentence "ERROR: <answer> <value> ...". The first bad answer,
in the order of ``cookiecutter.json``, is reported on one line on standard error and the hook
exits with status 1, which makes cookiecutter stop and remove the half-made project.

The hook uses only the standard library and never touches the network.
"""

from __future__ import annotations

import keyword
import re
import sys
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import unquote
from zoneinfo import available_timezones

#: Longest accepted slug. The slug names the PostgreSQL database, and the test database adds
#: a ``test_`` prefix; PostgreSQL silently truncates identifiers beyond 63 bytes.
MAX_SLUG_LENGTH: Final = 50

#: Longest accepted one-line text answer (project name, author name).
MAX_NAME_LENGTH: Final = 100

#: Longest accepted description: it ends up in ``pyproject.toml`` and the README.
MAX_DESCRIPTION_LENGTH: Final = 300

#: Names the slug must not take: importable packages of the generated project and of the
#: libraries it depends on or runs with. A project named like one of them would shadow it.
RESERVED_SLUGS: Final = frozenset(
    {
        # the generated project's own packages and folders
        "config",
        "tasksignal",
        "demo",
        "test",
        "tests",
        "bin",
        "benchmarks",
        "loadtest",
        "manage",
        # runtime dependencies
        "django",
        "celery",
        "kombu",
        "billiard",
        "amqp",
        "vine",
        "redis",
        "psycopg",
        "psycopg2",
        "gunicorn",
        "environ",
        "django_environ",
        "whitenoise",
        "asgiref",
        "sqlparse",
        "flower",
        "sentry_sdk",
        # development and load-test dependencies
        "pytest",
        "pytest_django",
        "ruff",
        "locust",
        "gevent",
        "greenlet",
        "psutil",
        "mypy",
        "django_stubs",
        "pre_commit",
    },
)

#: Standard-library module names; a slug must not shadow one either.
STDLIB_MODULES: Final = sys.stdlib_module_names

SUPPORTED_PYTHON_VERSIONS: Final = ("3.11", "3.12", "3.13")
SUPPORTED_POSTGRES_VERSIONS: Final = ("15", "16", "17")
SUPPORTED_DJANGO_VERSIONS: Final = ("6.1", "5.2")
#: The oldest Python each Django release runs on (Django's own "What Python version can I use").
DJANGO_MINIMUM_PYTHON: Final = {"6.1": "3.12", "5.2": "3.10"}
CI_TOOLS: Final = ("github", "none")
LICENSES: Final = ("MIT", "BSD-3-Clause", "Apache-2.0", "Not open source")
YES_NO: Final = ("y", "n")

SLUG_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*")
DOMAIN_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_PATTERN: Final = re.compile(r"(?:" + DOMAIN_LABEL + r"\.)+[a-z]{2,63}")
EMAIL_LOCAL_PART: Final = re.compile(r"[A-Za-z0-9._%+-]+")
#: Characters that would break the TOML and Python string literals the answers are rendered into.
UNSAFE_TEXT_CHARACTERS: Final = frozenset('"\\')


def _one_line_text_problem(value: str, *, max_length: int, required: bool) -> str | None:
    """Return why ``value`` is not a safe one-line text, or ``None`` when it is."""
    if required and not value.strip():
        return "must not be empty"
    if any(not character.isprintable() for character in value):
        return "must be a single line of printable characters"
    if UNSAFE_TEXT_CHARACTERS & set(value):
        return 'must not contain double quotes (") or backslashes (\\)'
    if len(value) > max_length:
        return f"must be at most {max_length} characters long"
    return None


def validate_project_name(value: str) -> str | None:
    r"""Check the human name of the service: one printable line, not empty.

    >>> validate_project_name("Task Signal Service") is None
    True
    >>> validate_project_name("Émile's Tasks") is None
    True
    >>> validate_project_name("   ")
    'must not be empty'
    >>> validate_project_name("two\nlines")
    'must be a single line of printable characters'
    >>> validate_project_name('The "Best" Service')
    'must not contain double quotes (") or backslashes (\\)'
    """
    return _one_line_text_problem(value, max_length=MAX_NAME_LENGTH, required=True)


def validate_project_slug(value: str) -> str | None:
    """Check the slug: a lowercase Python identifier that shadows no package.

    >>> validate_project_slug("task_signal_service") is None
    True
    >>> validate_project_slug("Bad-Slug")  # doctest: +ELLIPSIS
    "must be a lowercase Python identifier (a-z, 0-9, _; starting with a letter)..."
    >>> validate_project_slug("class")
    'must not be a Python keyword'
    >>> validate_project_slug("celery")
    'must not shadow a package the project uses (celery); pick another name'
    >>> validate_project_slug("email")
    'must not shadow a standard-library module (email); pick another name'
    """
    if not SLUG_PATTERN.fullmatch(value):
        return (
            "must be a lowercase Python identifier (a-z, 0-9, _; starting with a letter),"
            " e.g. 'task_signal_service'"
        )
    if keyword.iskeyword(value) or keyword.issoftkeyword(value):
        return "must not be a Python keyword"
    if value in RESERVED_SLUGS:
        return f"must not shadow a package the project uses ({value}); pick another name"
    if value in STDLIB_MODULES:
        return f"must not shadow a standard-library module ({value}); pick another name"
    if len(value) > MAX_SLUG_LENGTH:
        return f"must be at most {MAX_SLUG_LENGTH} characters long (it names the database)"
    return None


def validate_description(value: str) -> str | None:
    r"""Check the one-line description; it may be empty.

    >>> validate_description("Cancel, pause and resume running tasks.") is None
    True
    >>> validate_description("") is None
    True
    >>> validate_description("first line\nsecond line")
    'must be a single line of printable characters'
    """
    return _one_line_text_problem(value, max_length=MAX_DESCRIPTION_LENGTH, required=False)


def validate_author_name(value: str) -> str | None:
    """Check the author's name: one printable line, not empty.

    >>> validate_author_name("Ada Lovelace") is None
    True
    >>> validate_author_name("")
    'must not be empty'
    """
    return _one_line_text_problem(value, max_length=MAX_NAME_LENGTH, required=True)


def validate_domain_name(value: str) -> str | None:
    """Check a bare, lowercase DNS name with at least two labels (no scheme, port or path).

    >>> validate_domain_name("example.com") is None
    True
    >>> validate_domain_name("api.my-company.co.uk") is None
    True
    >>> validate_domain_name("https://example.com")
    "must be a bare lowercase domain name such as 'example.com' (no scheme, port or path)"
    >>> validate_domain_name("localhost")
    "must be a bare lowercase domain name such as 'example.com' (no scheme, port or path)"
    >>> validate_domain_name("-bad.example.com")
    "must be a bare lowercase domain name such as 'example.com' (no scheme, port or path)"
    """
    if len(value) > 253 or not DOMAIN_PATTERN.fullmatch(value):
        return (
            "must be a bare lowercase domain name such as 'example.com' (no scheme, port or path)"
        )
    return None


def validate_email(value: str) -> str | None:
    """Check an address shaped like ``local-part@domain.tld``.

    >>> validate_email("you@example.com") is None
    True
    >>> validate_email("first.last+tasks@mail.example.org") is None
    True
    >>> validate_email("you.example.com")
    "must be an e-mail address such as 'you@example.com'"
    >>> validate_email("you@localhost")
    "must be an e-mail address such as 'you@example.com'"
    """
    local_part, at, domain = value.rpartition("@")
    if not (
        at
        and EMAIL_LOCAL_PART.fullmatch(local_part)
        and validate_domain_name(domain.lower()) is None
    ):
        return "must be an e-mail address such as 'you@example.com'"
    return None


def validate_timezone(value: str) -> str | None:
    """Check an IANA time-zone key known to the local zoneinfo database (no network).

    >>> validate_timezone("UTC") is None
    True
    >>> validate_timezone("Europe/Berlin") is None
    True
    >>> validate_timezone("Mars/Olympus_Mons")
    "must be an IANA time-zone name such as 'UTC' or 'Europe/Berlin'"
    """
    if value != "UTC" and value not in available_timezones():
        return "must be an IANA time-zone name such as 'UTC' or 'Europe/Berlin'"
    return None


def _choice_problem(value: str, choices: tuple[str, ...]) -> str | None:
    """Return why ``value`` is not one of ``choices``, or ``None`` when it is."""
    if value not in choices:
        return "must be one of " + ", ".join(repr(choice) for choice in choices)
    return None


def validate_python_version(value: str) -> str | None:
    """Check the Python version is one the project supports.

    >>> validate_python_version("3.12") is None
    True
    >>> validate_python_version("3.10")
    "must be one of '3.11', '3.12', '3.13'"
    """
    return _choice_problem(value, SUPPORTED_PYTHON_VERSIONS)


def validate_django_version(value: str) -> str | None:
    """Check the Django release is one the template ships a lock file for.

    >>> validate_django_version("6.1") is None
    True
    >>> validate_django_version("5.1")
    "must be one of '6.1', '5.2'"
    """
    return _choice_problem(value, SUPPORTED_DJANGO_VERSIONS)


def validate_postgres_version(value: str) -> str | None:
    """Check the PostgreSQL major version is one the project supports.

    >>> validate_postgres_version("17") is None
    True
    >>> validate_postgres_version("14")
    "must be one of '15', '16', '17'"
    """
    return _choice_problem(value, SUPPORTED_POSTGRES_VERSIONS)


def validate_yes_no(value: str) -> str | None:
    """Check a yes/no answer is exactly ``y`` or ``n``.

    >>> validate_yes_no("y") is None
    True
    >>> validate_yes_no("n") is None
    True
    >>> validate_yes_no("yes")
    "must be 'y' or 'n'"
    """
    if value not in YES_NO:
        return "must be 'y' or 'n'"
    return None


def validate_ci_tool(value: str) -> str | None:
    """Check the CI tool is a supported one.

    >>> validate_ci_tool("github") is None
    True
    >>> validate_ci_tool("gitlab")
    "must be one of 'github', 'none'"
    """
    return _choice_problem(value, CI_TOOLS)


def validate_open_source_license(value: str) -> str | None:
    """Check the license is one the template ships.

    >>> validate_open_source_license("MIT") is None
    True
    >>> validate_open_source_license("GPL-3.0")
    "must be one of 'MIT', 'BSD-3-Clause', 'Apache-2.0', 'Not open source'"
    """
    return _choice_problem(value, LICENSES)


#: Every answer and its validator, in the order of ``cookiecutter.json``.
VALIDATORS: Final[Mapping[str, Callable[[str], str | None]]] = {
    "project_name": validate_project_name,
    "project_slug": validate_project_slug,
    "description": validate_description,
    "author_name": validate_author_name,
    "email": validate_email,
    "domain_name": validate_domain_name,
    "timezone": validate_timezone,
    "python_version": validate_python_version,
    "django_version": validate_django_version,
    "postgres_version": validate_postgres_version,
    "use_docker": validate_yes_no,
    "use_flower": validate_yes_no,
    "use_sentry": validate_yes_no,
    "use_celery_beat": validate_yes_no,
    "ci_tool": validate_ci_tool,
    "include_demo_tasks": validate_yes_no,
    "open_source_license": validate_open_source_license,
}


def _version(text: str) -> tuple[int, ...]:
    """Turn ``"3.12"`` into ``(3, 12)``, so that 3.9 sorts before 3.12 (strings would not)."""
    return tuple(int(part) for part in text.split("."))


def combination_problem(answers: Mapping[str, str]) -> str | None:
    """Return why two valid answers cannot go together, or ``None`` when they can.

    Each answer must already be valid on its own; pairs the mapping lacks are not checked.

    >>> combination_problem({"django_version": "5.2", "python_version": "3.11"}) is None
    True
    >>> print(combination_problem({"django_version": "6.1", "python_version": "3.11"}))
    ... # doctest: +NORMALIZE_WHITESPACE
    ERROR: django_version '6.1' needs Python 3.12 or newer, but python_version is '3.11':
    choose django_version 5.2 or python_version 3.12+
    """
    django, python = answers.get("django_version"), answers.get("python_version")
    if django is None or python is None:
        return None
    minimum = DJANGO_MINIMUM_PYTHON[django]
    if _version(python) < _version(minimum):
        return (
            f"ERROR: django_version {django!r} needs Python {minimum} or newer, but"
            f" python_version is {python!r}: choose django_version"
            f" {SUPPORTED_DJANGO_VERSIONS[-1]} or python_version {minimum}+"
        )
    return None


def first_error(answers: Mapping[str, str]) -> str | None:
    """Return the one-line error for the first bad answer, or ``None`` when all are good.

    Each answer is checked on its own first, in question order; then answers that cannot go
    together (:func:`combination_problem`). Answers the mapping lacks are not checked (tests
    pass partial mappings).

    >>> first_error({"project_slug": "fine", "use_docker": "y"}) is None
    True
    >>> first_error({"project_slug": "Bad-Slug", "use_docker": "maybe"})  # doctest: +ELLIPSIS
    "ERROR: project_slug 'Bad-Slug' must be a lowercase Python identifier ..."
    """
    for name, validate in VALIDATORS.items():
        if name in answers:
            problem = validate(answers[name])
            if problem is not None:
                return f"ERROR: {name} {answers[name]!r} {problem}"
    return combination_problem(answers)


def main() -> int:
    """Validate the rendered answers; print the first problem and return the exit status."""
    rendered = {
        "project_name": "{{ cookiecutter.project_name | urlencode }}",
        "project_slug": "{{ cookiecutter.project_slug | urlencode }}",
        "description": "{{ cookiecutter.description | urlencode }}",
        "author_name": "{{ cookiecutter.author_name | urlencode }}",
        "email": "{{ cookiecutter.email | urlencode }}",
        "domain_name": "{{ cookiecutter.domain_name | urlencode }}",
        "timezone": "{{ cookiecutter.timezone | urlencode }}",
        "python_version": "{{ cookiecutter.python_version | urlencode }}",
        "django_version": "{{ cookiecutter.django_version | urlencode }}",
        "postgres_version": "{{ cookiecutter.postgres_version | urlencode }}",
        "use_docker": "{{ cookiecutter.use_docker | urlencode }}",
        "use_flower": "{{ cookiecutter.use_flower | urlencode }}",
        "use_sentry": "{{ cookiecutter.use_sentry | urlencode }}",
        "use_celery_beat": "{{ cookiecutter.use_celery_beat | urlencode }}",
        "ci_tool": "{{ cookiecutter.ci_tool | urlencode }}",
        "include_demo_tasks": "{{ cookiecutter.include_demo_tasks | urlencode }}",
        "open_source_license": "{{ cookiecutter.open_source_license | urlencode }}",
    }
    # Jinja's urlencode leaves only letters, digits and _.-~/% in each string, so an answer
    # with quotes, backslashes or newlines cannot break this file; unquote restores it exactly.
    answers = {name: unquote(text) for name, text in rendered.items()}
    error = first_error(answers)
    if error is not None:
        print(error, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
