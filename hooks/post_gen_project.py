"""Shape the freshly generated project to the answers, then say what to do next.

Cookiecutter renders this file with Jinja and runs it inside the generated project. The answers
are rendered only into the dictionary built in ``main()``, so the raw file stays a plain Python
module that tests import by path.

What it does, in order:

1. Removes the files that belong to options that were turned off, as listed in ``REMOVALS``
   (an option, the answer that turns it off, and the paths or glob patterns to delete).
2. Installs the lock files made for these answers: the template carries, in ``.locks/``, one
   ``requirements.txt`` (runtime) and one ``requirements-dev.txt`` (runtime and dev tools) per
   set of answers that changes the dependencies (:func:`lock_key`), made by the template's
   ``scripts/lock.py``; the hook moves the matching pair to the project root and deletes the
   rest. A missing pair fails the bake: nothing is ever resolved at bake time.
3. Makes every script in ``bin/`` executable.
4. Writes ``.env`` from ``.env.example`` (when the project has one) with a fresh
   ``DJANGO_SECRET_KEY`` and ``POSTGRES_PASSWORD`` from :mod:`secrets`; URLs in the file that
   carried the example password get the new one, so the file stays consistent. Empty
   ``LOADTEST_UID`` / ``LOADTEST_GID`` lines get the baking user's uid and gid: compose runs
   its load-test container as them, so the reports it writes through a bind mount are theirs.
5. Prints the next steps.

It uses only the standard library and never touches the network.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, NamedTuple
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit


class Removal(NamedTuple):
    """Paths to delete when ``option`` has the answer ``when``."""

    option: str
    when: str
    paths: tuple[str, ...]


#: What each disabled option takes away. Paths are relative to the project root; a path with
#: ``*`` is a glob pattern. Procfile lines are the Procfile template's business, not this table's.
REMOVALS: Final = (
    Removal(
        "use_docker", "n", ("Dockerfile", "compose.yaml", ".dockerignore", "bin/compose-check")
    ),
    Removal("use_flower", "n", ("bin/flower", "tests/test_flower.py")),
    Removal("use_sentry", "n", ("config/sentry.py", "tests/test_sentry.py")),
    Removal("use_celery_beat", "n", ("bin/beat", "tests/test_beat.py")),
    Removal("ci_tool", "none", (".github",)),
    Removal(
        "include_demo_tasks",
        "n",
        ("demo", "loadtest", "bin/loadtest", "docs/loadtest.md", "tests/test_demo*.py"),
    ),
    Removal("open_source_license", "Not open source", ("LICENSE",)),
)

#: Where the template keeps its lock files, one folder per :func:`lock_key`.
LOCK_STORE: Final = ".locks"
#: The lock files of each set, by their name in the project root.
LOCK_FILES: Final = ("requirements.txt", "requirements-dev.txt")
#: The answers that change what gets installed, in the order :func:`lock_key` names them.
LOCK_OPTIONS: Final = ("django_version", "use_flower", "use_sentry", "include_demo_tasks")
ENV_EXAMPLE: Final = ".env.example"
ENV_FILE: Final = ".env"
SECRET_KEY_VARIABLE: Final = "DJANGO_SECRET_KEY"  # noqa: S105 - a variable name
DATABASE_PASSWORD_VARIABLE: Final = "POSTGRES_PASSWORD"  # noqa: S105 - a variable name
#: Variables filled with the baking user's ids when the example leaves them empty.
OWNER_VARIABLES: Final = ("LOADTEST_UID", "LOADTEST_GID")
#: ``token_urlsafe(50)`` gives 67 characters of [A-Za-z0-9_-]: well past Django's deploy check
#: (50 characters, 5 distinct) and safe unquoted in a dotenv file and in a URL.
SECRET_KEY_BYTES: Final = 50
DATABASE_PASSWORD_BYTES: Final = 24
#: ``KEY=value`` with an optional ``export`` in front, as dotenv files write it.
ASSIGNMENT: Final = re.compile(r"^(?P<head>\s*(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=)")


def patterns_to_remove(answers: Mapping[str, str]) -> list[str]:
    """List the paths and glob patterns that the answers turn off.

    >>> patterns_to_remove({"use_flower": "n", "use_docker": "y"})
    ['bin/flower', 'tests/test_flower.py']
    >>> patterns_to_remove({"include_demo_tasks": "n"})
    ['demo', 'loadtest', 'bin/loadtest', 'docs/loadtest.md', 'tests/test_demo*.py']
    >>> patterns_to_remove({"use_flower": "y"})
    []
    """
    return [
        path
        for removal in REMOVALS
        if answers.get(removal.option) == removal.when
        for path in removal.paths
    ]


def lock_key(answers: Mapping[str, str]) -> str:
    """Name the set of lock files that a project with ``answers`` installs from.

    >>> lock_key({"django_version": "6.1", "use_flower": "n", "use_sentry": "y",
    ...           "include_demo_tasks": "y"})
    'django6.1-noflower-sentry-demo'
    """
    flags = [
        word if answers[option] == "y" else f"no{word}"
        for option, word in zip(LOCK_OPTIONS[1:], ("flower", "sentry", "demo"), strict=True)
    ]
    return "-".join([f"django{answers['django_version']}", *flags])


class MissingLockError(RuntimeError):
    """The template has no lock files for a set of answers (``scripts/lock.py`` makes them)."""


def install_lock_files(root: Path, answers: Mapping[str, str]) -> list[Path]:
    """Move the lock files for ``answers`` from ``root/.locks`` to ``root``; drop the rest.

    Returns the installed files. Raises :class:`MissingLockError`, leaving everything in
    place, when the template lacks one of them.
    """
    store = root / LOCK_STORE
    chosen = store / lock_key(answers)
    missing = [name for name in LOCK_FILES if not (chosen / name).is_file()]
    if missing:
        message = f"the template has no {', '.join(missing)} for {lock_key(answers)}"
        raise MissingLockError(f"{message}: run scripts/lock.py in the template")
    installed = []
    for name in LOCK_FILES:
        target = root / name
        (chosen / name).replace(target)
        installed.append(target)
    shutil.rmtree(store)
    return installed


def remove_paths(root: Path, patterns: Iterable[str]) -> list[Path]:
    """Delete the files and folders under ``root`` that match ``patterns``; return what went.

    A pattern that matches nothing is not an error: the template may not ship that file.
    """
    removed = []
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def make_executable(path: Path) -> None:
    """Add the execute bit wherever ``path`` has the read bit (user, group, other)."""
    mode = path.stat().st_mode
    path.chmod(mode | ((mode & (stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)) >> 2))


def make_scripts_executable(root: Path) -> list[Path]:
    """Make every file in ``root/bin`` executable; return those files."""
    scripts = sorted(path for path in (root / "bin").glob("*") if path.is_file())
    for script in scripts:
        make_executable(script)
    return scripts


def _with_password(url: str, old: str, new: str) -> str:
    """Return ``url`` with password ``new`` if its password is ``old``, else ``url`` unchanged.

    >>> _with_password("postgres://app:change-me@db:5432/app", "change-me", "s3cret")
    'postgres://app:s3cret@db:5432/app'
    >>> _with_password("postgres://app:other@db:5432/app", "change-me", "s3cret")
    'postgres://app:other@db:5432/app'
    >>> _with_password("redis://redis:6379/0", "change-me", "s3cret")
    'redis://redis:6379/0'
    """
    try:
        parts: SplitResult = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not old or password != old:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    username = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{username}:{new}@{hostinfo}"))


def render_env(
    example: str,
    *,
    secret_key: str,
    database_password: str,
    defaults: Mapping[str, str] | None = None,
) -> str:
    r"""Return the text of ``.env``: ``example`` with the two secrets filled in.

    Lines, comments and order stay as they are; only the values of ``DJANGO_SECRET_KEY`` and
    ``POSTGRES_PASSWORD`` change, plus any URL whose password was the example password, and
    variables the example leaves empty that ``defaults`` has a value for.

    >>> print(render_env(
    ...     "# local settings\n"
    ...     "DJANGO_SECRET_KEY=change-me\n"
    ...     "POSTGRES_PASSWORD=postgres\n"
    ...     "DATABASE_URL=postgres://postgres:postgres@db:5432/app\n",
    ...     secret_key="k" * 50,
    ...     database_password="pw",
    ... ), end="")
    # local settings
    DJANGO_SECRET_KEY=kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk
    POSTGRES_PASSWORD=pw
    DATABASE_URL=postgres://postgres:pw@db:5432/app
    """
    lines = example.splitlines(keepends=True)
    old_password = ""
    for line in lines:
        match = ASSIGNMENT.match(line)
        if match and match["key"] == DATABASE_PASSWORD_VARIABLE:
            old_password = _strip_quotes(line[match.end() :].strip())
    new_values = {SECRET_KEY_VARIABLE: secret_key, DATABASE_PASSWORD_VARIABLE: database_password}
    for line in lines:
        match = ASSIGNMENT.match(line)
        if match and match["key"] in (defaults or {}) and not line[match.end() :].strip():
            new_values.setdefault(match["key"], (defaults or {})[match["key"]])
    return "".join(
        _render_line(line, new_values, old_password, database_password) for line in lines
    )


def owner_ids() -> dict[str, str]:
    """The baking user's uid and gid for :data:`OWNER_VARIABLES` (none where ids do not exist).

    >>> ids = owner_ids()
    >>> sorted(ids) == sorted(OWNER_VARIABLES) or ids == {}
    True
    """
    if not hasattr(os, "getuid"):
        return {}
    return dict(zip(OWNER_VARIABLES, (str(os.getuid()), str(os.getgid())), strict=True))


def _render_line(
    line: str, new_values: Mapping[str, str], old_password: str, new_password: str
) -> str:
    """Return one ``.env`` line with its new value, or unchanged when nothing applies."""
    match = ASSIGNMENT.match(line)
    if not match:
        return line
    newline = line[len(line.rstrip("\r\n")) :]
    if match["key"] in new_values:
        return f"{match['head']}{new_values[match['key']]}{newline}"
    value = _strip_quotes(line[match.end() :].strip())
    updated = _with_password(value, old_password, new_password)
    return line if updated == value else f"{match['head']}{updated}{newline}"


def _strip_quotes(value: str) -> str:
    """Strip one pair of matching quotes from a dotenv value.

    >>> _strip_quotes('"quoted"'), _strip_quotes("'single'"), _strip_quotes("bare")
    ('quoted', 'single', 'bare')
    """
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def write_env_file(root: Path) -> Path | None:
    """Write ``root/.env`` from ``root/.env.example`` with fresh secrets; mode 0600.

    Returns the new file, or ``None`` when the project has no example or already has a
    ``.env`` (an existing one is never overwritten).
    """
    example = root / ENV_EXAMPLE
    target = root / ENV_FILE
    if not example.is_file() or target.exists():
        return None
    text = render_env(
        example.read_text(encoding="utf-8"),
        secret_key=secrets.token_urlsafe(SECRET_KEY_BYTES),
        database_password=secrets.token_urlsafe(DATABASE_PASSWORD_BYTES),
        defaults=owner_ids(),
    )
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as env_file:
        env_file.write(text)
    return target


def next_steps(answers: Mapping[str, str]) -> str:
    """Return the instructions printed after a successful bake."""
    slug = answers["project_slug"]
    lines = [
        f"Created {answers['project_name']} in ./{slug}",
        "",
        "Next steps:",
        f"  cd {slug}",
        "  git init && git add . && git commit -m 'Initial commit'",
    ]
    if answers.get("use_docker") == "y":
        lines += [
            "  docker compose up --build --wait # web, worker, PostgreSQL and Redis",
        ]
    lines += [
        "  # or natively, with PostgreSQL and Redis running locally:",
        "  make install    # .venv with exactly requirements-dev.txt (uv)",
        "  make migrate && make test",
        "  .venv/bin/pre-commit install    # make lint before every commit",
        "",
        "Secrets for local use are in .env (never commit it); see .env.example for every setting.",
    ]
    return "\n".join(lines)


def main() -> int:
    """Apply the answers to the generated project in the current directory."""
    rendered = {
        "project_name": "{{ cookiecutter.project_name | urlencode }}",
        "project_slug": "{{ cookiecutter.project_slug | urlencode }}",
        "use_docker": "{{ cookiecutter.use_docker | urlencode }}",
        "django_version": "{{ cookiecutter.django_version | urlencode }}",
        "use_flower": "{{ cookiecutter.use_flower | urlencode }}",
        "use_sentry": "{{ cookiecutter.use_sentry | urlencode }}",
        "use_celery_beat": "{{ cookiecutter.use_celery_beat | urlencode }}",
        "ci_tool": "{{ cookiecutter.ci_tool | urlencode }}",
        "include_demo_tasks": "{{ cookiecutter.include_demo_tasks | urlencode }}",
        "open_source_license": "{{ cookiecutter.open_source_license | urlencode }}",
    }
    # urlencode keeps any answer from breaking this file's syntax; unquote restores it.
    answers = {name: unquote(text) for name, text in rendered.items()}
    root = Path.cwd()
    remove_paths(root, patterns_to_remove(answers))
    try:
        install_lock_files(root, answers)
    except MissingLockError as error:
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        return 1
    make_scripts_executable(root)
    write_env_file(root)
    print(next_steps(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
