"""The post-generation hook's helpers, called directly on the raw hook module."""

from __future__ import annotations

import doctest
import itertools
import os
import re
import stat
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_hook
from template_options import CHOICE_OPTIONS, DEFAULT_ANSWERS, REPO_ROOT

EXAMPLE_ENV = """\
# Settings for local runs; copy to .env
DJANGO_SECRET_KEY=change-me
export DJANGO_DEBUG=True
POSTGRES_PASSWORD="postgres"
DATABASE_URL=postgres://app:postgres@db:5432/app
OTHER_URL=postgres://app:different@db:5432/app
REDIS_URL=redis://redis:6379/0
"""


def test_docstring_examples_hold(post_gen: ModuleType) -> None:
    results = doctest.testmod(post_gen, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0, "the hook's docstrings have no examples"
    assert results.failed == 0, f"{results.failed} docstring examples of the hook fail"


def test_removal_table_names_real_options_and_answers(post_gen: ModuleType) -> None:
    for removal in post_gen.REMOVALS:
        assert removal.option in CHOICE_OPTIONS, f"{removal.option} is not a template option"
        assert removal.when in CHOICE_OPTIONS[removal.option], (
            f"{removal.option} never has the answer {removal.when!r}"
        )


def test_default_answers_remove_only_flower_and_sentry(post_gen: ModuleType) -> None:
    assert post_gen.patterns_to_remove(DEFAULT_ANSWERS) == [
        "bin/flower",
        "tests/test_flower.py",
        "config/sentry.py",
        "tests/test_sentry.py",
    ]


def test_every_option_turned_off_removes_its_files(post_gen: ModuleType) -> None:
    answers = DEFAULT_ANSWERS | {
        "use_docker": "n",
        "use_flower": "n",
        "use_celery_beat": "n",
        "ci_tool": "none",
        "include_demo_tasks": "n",
        "open_source_license": "Not open source",
    }
    assert set(post_gen.patterns_to_remove(answers)) == {
        "Dockerfile",
        "compose.yaml",
        ".dockerignore",
        "bin/compose-check",
        "bin/flower",
        "tests/test_flower.py",
        "config/sentry.py",
        "tests/test_sentry.py",
        "bin/beat",
        "tests/test_beat.py",
        ".github",
        "demo",
        "loadtest",
        "bin/loadtest",
        "docs/loadtest.md",
        "tests/test_demo*.py",
        "LICENSE",
    }


def _tree(root: Path, *paths: str) -> None:
    for relative in paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x", encoding="utf-8")


def test_remove_paths_deletes_files_folders_and_globs(post_gen: ModuleType, tmp_path: Path) -> None:
    _tree(
        tmp_path,
        "Dockerfile",
        "demo/tasks.py",
        "tests/test_demo_tasks.py",
        "tests/test_demo.py",
        "tests/test_signals.py",
    )
    post_gen.remove_paths(tmp_path, ["Dockerfile", "demo", "tests/test_demo*.py"])
    remaining = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert remaining == ["tests", "tests/test_signals.py"], f"unexpected leftovers: {remaining}"


def test_remove_paths_ignores_paths_the_template_does_not_ship(
    post_gen: ModuleType, tmp_path: Path
) -> None:
    assert post_gen.remove_paths(tmp_path, ["compose.yaml", "tests/test_demo*.py"]) == []


def test_scripts_in_bin_become_executable(post_gen: ModuleType, tmp_path: Path) -> None:
    _tree(tmp_path, "bin/web", "bin/worker")
    for script in (tmp_path / "bin").iterdir():
        script.chmod(0o644)
    post_gen.make_scripts_executable(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "bin").iterdir()}
    assert modes == {"web": 0o755, "worker": 0o755}, f"unexpected modes: {modes}"


def test_execute_bits_follow_read_bits(post_gen: ModuleType, tmp_path: Path) -> None:
    script = tmp_path / "private"
    script.write_text("#!/bin/sh\n", encoding="utf-8")
    script.chmod(0o600)
    post_gen.make_executable(script)
    assert stat.S_IMODE(script.stat().st_mode) == 0o700, "a private script became world-runnable"


def _env(text: str) -> dict[str, str]:
    pairs = re.findall(r"^(?:export\s+)?(\w+)=(.*)$", text, flags=re.MULTILINE)
    return dict(pairs)


def test_env_gets_the_new_secret_key_and_password(post_gen: ModuleType) -> None:
    rendered = _env(post_gen.render_env(EXAMPLE_ENV, secret_key="k" * 60, database_password="pw"))
    assert rendered["DJANGO_SECRET_KEY"] == "k" * 60
    assert rendered["POSTGRES_PASSWORD"] == "pw"


def test_env_urls_with_the_example_password_get_the_new_one(post_gen: ModuleType) -> None:
    rendered = _env(post_gen.render_env(EXAMPLE_ENV, secret_key="k" * 60, database_password="pw"))
    assert rendered["DATABASE_URL"] == "postgres://app:pw@db:5432/app"
    assert rendered["OTHER_URL"] == "postgres://app:different@db:5432/app", (
        "a URL with some other password was changed"
    )


def test_env_keeps_every_other_line_as_it_was(post_gen: ModuleType) -> None:
    rendered = post_gen.render_env(EXAMPLE_ENV, secret_key="k" * 60, database_password="pw")
    unchanged = [
        "# Settings for local runs; copy to .env",
        "export DJANGO_DEBUG=True",
        "REDIS_URL=redis://redis:6379/0",
    ]
    lines = rendered.splitlines()
    assert len(lines) == len(EXAMPLE_ENV.splitlines()), "lines were added or dropped"
    for line in unchanged:
        assert line in lines, f"{line!r} did not survive"


def test_env_empty_owner_ids_get_the_defaults(post_gen: ModuleType) -> None:
    example = "LOADTEST_UID=\nLOADTEST_GID=\nOTHER=\n"
    rendered = _env(
        post_gen.render_env(
            example,
            secret_key="k" * 60,
            database_password="pw",
            defaults={"LOADTEST_UID": "1234", "LOADTEST_GID": "5678"},
        )
    )
    assert rendered == {"LOADTEST_UID": "1234", "LOADTEST_GID": "5678", "OTHER": ""}


def test_env_owner_ids_already_set_are_kept(post_gen: ModuleType) -> None:
    rendered = _env(
        post_gen.render_env(
            "LOADTEST_UID=42\n",
            secret_key="k" * 60,
            database_password="pw",
            defaults={"LOADTEST_UID": "1234"},
        )
    )
    assert rendered["LOADTEST_UID"] == "42", "an explicit uid in the example was overwritten"


def test_env_file_names_the_baking_user_as_load_test_owner(
    post_gen: ModuleType, tmp_path: Path
) -> None:
    (tmp_path / ".env.example").write_text("LOADTEST_UID=\nLOADTEST_GID=\n", encoding="utf-8")
    values = _env(post_gen.write_env_file(tmp_path).read_text(encoding="utf-8"))
    assert values == {"LOADTEST_UID": str(os.getuid()), "LOADTEST_GID": str(os.getgid())}, (
        "the compose load test would not run as the user who owns loadtest/reports"
    )


def test_env_file_is_private_and_has_fresh_secrets(post_gen: ModuleType, tmp_path: Path) -> None:
    (tmp_path / ".env.example").write_text(EXAMPLE_ENV, encoding="utf-8")
    env_file = post_gen.write_env_file(tmp_path)
    assert env_file == tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600, ".env is readable by others"
    values = _env(env_file.read_text(encoding="utf-8"))
    assert len(values["DJANGO_SECRET_KEY"]) >= 50, "the secret key is too short for --deploy"
    assert len(set(values["DJANGO_SECRET_KEY"])) >= 5, "the secret key is not varied enough"
    assert values["POSTGRES_PASSWORD"] not in {"postgres", '"postgres"'}, "password not replaced"


def test_each_env_file_gets_its_own_secrets(post_gen: ModuleType, tmp_path: Path) -> None:
    keys = set()
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / ".env.example").write_text(EXAMPLE_ENV, encoding="utf-8")
        keys.add(
            _env(post_gen.write_env_file(folder).read_text(encoding="utf-8"))["DJANGO_SECRET_KEY"]
        )
    assert len(keys) == 2, "two projects got the same secret key"


def test_existing_env_file_is_never_overwritten(post_gen: ModuleType, tmp_path: Path) -> None:
    (tmp_path / ".env.example").write_text(EXAMPLE_ENV, encoding="utf-8")
    (tmp_path / ".env").write_text("MINE=1\n", encoding="utf-8")
    assert post_gen.write_env_file(tmp_path) is None
    assert (tmp_path / ".env").read_text(encoding="utf-8") == "MINE=1\n"


def test_no_env_file_without_an_example(post_gen: ModuleType, tmp_path: Path) -> None:
    assert post_gen.write_env_file(tmp_path) is None
    assert not (tmp_path / ".env").exists()


@pytest.mark.parametrize("use_docker", ["y", "n"])
def test_next_steps_mention_compose_only_with_docker(post_gen: ModuleType, use_docker: str) -> None:
    text = post_gen.next_steps(DEFAULT_ANSWERS | {"use_docker": use_docker})
    assert f"cd {DEFAULT_ANSWERS['project_slug']}" in text, "next steps do not say where to go"
    assert ("docker compose" in text) == (use_docker == "y"), (
        f"docker compose {'missing' if use_docker == 'y' else 'offered'} for {use_docker=}"
    )


def test_main_renders_every_answer_the_hook_uses() -> None:
    source = (REPO_ROOT / "hooks" / "post_gen_project.py").read_text(encoding="utf-8")
    rendered = set(re.findall(r'"(\w+)": "\{\{ cookiecutter\.\1 \| urlencode \}\}"', source))
    needed = (
        {"project_name", "project_slug"}
        | set(re.findall(r'Removal\("(\w+)"', source))
        | set(load_hook("post_gen_project").LOCK_OPTIONS)
    )
    assert needed <= rendered, f"main() does not render {sorted(needed - rendered)}"


# --- lock files -------------------------------------------------------------------------------


def test_lock_key_names_every_answer_that_changes_the_dependencies(post_gen: ModuleType) -> None:
    keys = {
        post_gen.lock_key(dict(zip(post_gen.LOCK_OPTIONS, values, strict=True)))
        for values in itertools.product(*(CHOICE_OPTIONS[name] for name in post_gen.LOCK_OPTIONS))
    }
    expected = 1
    for name in post_gen.LOCK_OPTIONS:
        expected *= len(CHOICE_OPTIONS[name])
    assert len(keys) == expected, "two answer sets share a lock key"
    assert post_gen.lock_key(DEFAULT_ANSWERS) == "django6.1-noflower-nosentry-demo"


def _lock_store(root: Path, *keys: str) -> None:
    for key in keys:
        for name in ("requirements.txt", "requirements-dev.txt"):
            path = root / ".locks" / key / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {key} {name}\n", encoding="utf-8")


def test_install_lock_files_keeps_the_chosen_pair_and_drops_the_store(
    post_gen: ModuleType, tmp_path: Path
) -> None:
    chosen = post_gen.lock_key(DEFAULT_ANSWERS)
    _lock_store(tmp_path, chosen, "django5.2-flower-sentry-nodemo")
    installed = post_gen.install_lock_files(tmp_path, DEFAULT_ANSWERS)
    assert [path.name for path in installed] == ["requirements.txt", "requirements-dev.txt"]
    assert (tmp_path / "requirements-dev.txt").read_text() == f"# {chosen} requirements-dev.txt\n"
    assert not (tmp_path / ".locks").exists(), "the lock store was left in the project"


def test_a_missing_lock_pair_is_an_error_naming_the_set(
    post_gen: ModuleType, tmp_path: Path
) -> None:
    _lock_store(tmp_path, "django5.2-flower-sentry-nodemo")
    with pytest.raises(post_gen.MissingLockError, match=r"django6\.1-noflower-nosentry-demo"):
        post_gen.install_lock_files(tmp_path, DEFAULT_ANSWERS)
    assert (tmp_path / ".locks").is_dir(), "a failed install must leave the store alone"
