"""Every bake of the template is a clean, consistent project.

The template is baked with its defaults, with a pairwise cover of all its choice options (every
pair of answers of any two options appears in some bake) and with unusual but valid free-text
answers. Each bake must succeed, leave no template syntax behind, contain exactly the files its
options call for, and pass the generated project's own linters and the compose and GitHub
workflow schemas.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import environ
import pytest
from baked import project_processes
from conftest import Bake, tool
from template_options import (
    ALWAYS_PRESENT,
    ALWAYS_PROCESSES,
    DEFAULT_ANSWERS,
    LICENSE_MARKERS,
    PROCESS_WHEN,
    WIRING_FILES,
    case_id,
    expected_presence,
    pairwise_cases,
    removed_paths,
)

#: Valid answers that tend to break templates: quotes, non-ASCII, markup characters, a
#: percent sign, a deep time zone and a slug that differs from the name.
UNUSUAL_ANSWERS = {
    "project_name": "Émile's Task-Signal Service",
    "project_slug": "emile_tasks",
    "description": "Cancels, pauses & resumes <tasks>: 100% 'safe'.",
    "author_name": "Zoë O'Brien",
    "email": "zoe.obrien+tasks@example.org",
    "domain_name": "tasks.example.org",
    "timezone": "America/Argentina/Buenos_Aires",
}

BAKES = [
    pytest.param({}, id="default"),
    *(pytest.param(case, id=case_id(case)) for case in pairwise_cases()),
    pytest.param(UNUSUAL_ANSWERS, id="unusual-answers"),
]


def _bakes_where(predicate: Callable[[Mapping[str, str]], bool]) -> list:
    """The bake parameters whose full answers satisfy ``predicate``."""
    return [case for case in BAKES if predicate(DEFAULT_ANSWERS | case.values[0])]


DOCKER_BAKES = _bakes_where(lambda answers: answers["use_docker"] == "y")
GITHUB_BAKES = _bakes_where(lambda answers: answers["ci_tool"] == "github")
NO_DEMO_BAKES = _bakes_where(lambda answers: answers["include_demo_tasks"] == "n")
LICENSED_BAKES = _bakes_where(lambda answers: answers["open_source_license"] in LICENSE_MARKERS)

#: Template syntax left behind. ``${{`` (GitHub Actions expressions) and ``${#`` (shell string
#: length) are legitimate in generated files, and so is Django syntax in Django templates.
LEFTOVER = re.compile(r"(?<!\$)\{[{%#]")
COOKIECUTTER_REFERENCE = re.compile(r"\{[{%#][^}]*\bcookiecutter\b")


def _is_django_template(path: Path) -> bool:
    return "templates" in path.parts and path.suffix in {".html", ".txt", ".xml"}


def _text_files(root: Path) -> list[Path]:
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(root).parts
    )


def _run_tool(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, timeout=300
    )


@pytest.fixture(params=BAKES)
def baked(request: pytest.FixtureRequest, bake: Callable[[Mapping[str, str]], Bake]) -> Bake:
    """A bake from the matrix: default, pairwise cover and unusual answers."""
    return bake(request.param)


@pytest.fixture(params=DOCKER_BAKES)
def docker_baked(request: pytest.FixtureRequest, bake: Callable[[Mapping[str, str]], Bake]) -> Bake:
    """A bake with use_docker=y."""
    return bake(request.param)


@pytest.fixture(params=GITHUB_BAKES)
def github_baked(request: pytest.FixtureRequest, bake: Callable[[Mapping[str, str]], Bake]) -> Bake:
    """A bake with ci_tool=github."""
    return bake(request.param)


@pytest.fixture(params=NO_DEMO_BAKES)
def no_demo_baked(
    request: pytest.FixtureRequest,
    bake: Callable[[Mapping[str, str]], Bake],
) -> Bake:
    """A bake with include_demo_tasks=n."""
    return bake(request.param)


@pytest.fixture(params=LICENSED_BAKES)
def licensed_baked(
    request: pytest.FixtureRequest,
    bake: Callable[[Mapping[str, str]], Bake],
) -> Bake:
    """A bake with an open-source license."""
    return bake(request.param)


# --- the bake itself --------------------------------------------------------------------------


def test_bake_exits_zero(baked: Bake) -> None:
    assert baked.exit_code == 0, f"bake exited {baked.exit_code}: {baked.error}"
    assert baked.project.is_dir(), "the bake reported success but made no project folder"


def test_project_folder_is_named_after_the_slug(baked: Bake) -> None:
    assert baked.project.name == baked.answers["project_slug"], (
        f"project folder is {baked.project.name!r}, expected the slug"
        f" {baked.answers['project_slug']!r}"
    )


def test_no_template_syntax_is_left_behind(baked: Bake) -> None:
    leftovers = []
    for path in _text_files(baked.project):
        relative = path.relative_to(baked.project)
        if LEFTOVER.search(str(relative)):
            leftovers.append(f"{relative}: template syntax in the file name")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        pattern = COOKIECUTTER_REFERENCE if _is_django_template(path) else LEFTOVER
        for number, line in enumerate(text.splitlines(), start=1):
            if pattern.search(line):
                leftovers.append(f"{relative}:{number}: {line.strip()[:120]}")
    assert not leftovers, "unrendered template syntax:\n" + "\n".join(leftovers)


# --- files ------------------------------------------------------------------------------------


def test_files_every_project_needs_are_present(baked: Bake) -> None:
    missing = [path for path in ALWAYS_PRESENT if not baked.has(path)]
    assert not missing, f"missing from every bake's required files: {missing}"


def test_optional_files_are_present_exactly_when_their_option_is_on(baked: Bake) -> None:
    wrong = [
        f"{path} should be {'present' if wanted else 'absent'}"
        for path, wanted in expected_presence(baked.answers).items()
        if baked.has(path) != wanted
    ]
    assert not wrong, f"files do not follow the options {dict(baked.answers)}: {wrong}"


def test_wiring_files_never_point_at_removed_paths(baked: Bake) -> None:
    # A directory counts when named with its slash ("loadtest/"), so the word alone (a
    # Makefile target, a compose profile) is not mistaken for the path.
    removed = [
        path if "." in Path(path).name or "/" in path else f"{path}/"
        for path in removed_paths(baked.answers)
        if path not in {".github", "LICENSE"}
    ]
    dangling = []
    for name in WIRING_FILES:
        wiring = baked.project / name
        if not wiring.is_file():
            continue
        for number, line in enumerate(wiring.read_text(encoding="utf-8").splitlines(), start=1):
            dangling += [f"{name}:{number}: {path}" for path in removed if path in line]
    assert not dangling, "references to paths these options removed:\n" + "\n".join(dangling)


def test_no_demo_tests_ship_without_the_demo_app(no_demo_baked: Bake) -> None:
    tests = no_demo_baked.project / "tests"
    demo_tests = sorted(str(path.relative_to(tests)) for path in tests.rglob("test_demo*.py"))
    assert not demo_tests, f"demo tests left without the demo app: {demo_tests}"


def _layout_names(readme: str) -> list[str]:
    """Return the paths named by the README's layout block.

    Top-level entries, and under a folder its entries indented by two (``broker.py,
    results.py`` names two); continuation lines, indented further, name nothing.
    """
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names, folder = [], ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        first_column = line.strip().split("  ", 1)[0]
        if not first_column or indent > 2:
            continue
        if indent == 0:
            folder = first_column if first_column.endswith("/") else ""
        for name in first_column.split(", "):
            names.append(name if indent == 0 else folder + name)
    return names


def test_the_readme_layout_names_only_files_that_exist(baked: Bake) -> None:
    names = _layout_names((baked.path / "README.md").read_text(encoding="utf-8"))
    missing = [name for name in names if not list(baked.path.glob(name.rstrip("/")))]
    assert names, "the README has no layout block"
    assert not missing, f"the README's layout names what this bake does not have: {missing}"


def test_the_readme_layout_names_every_module_of_the_tasksignal_app(baked: Bake) -> None:
    named = _layout_names((baked.path / "README.md").read_text(encoding="utf-8"))
    covered = {path for name in named for path in baked.path.glob(name.rstrip("/"))}
    unnamed = [
        module.name
        for module in sorted((baked.path / "tasksignal").glob("*.py"))
        if module not in covered and module.name not in ("__init__.py", "apps.py")
    ]
    assert not unnamed, f"the README's layout leaves out tasksignal modules: {unnamed}"


def test_env_file_gets_fresh_secrets_and_private_permissions(baked: Bake) -> None:
    env_file = baked.project / ".env"
    assert env_file.is_file(), ".env was not generated from .env.example"
    mode = stat.S_IMODE(env_file.stat().st_mode)
    assert mode == 0o600, f".env has mode {oct(mode)}, expected 0o600 (it holds secrets)"
    example = _dotenv(baked.project / ".env.example")
    generated = _dotenv(env_file)
    secret = generated.get("DJANGO_SECRET_KEY", "")
    assert len(secret) >= 50, f"DJANGO_SECRET_KEY in .env is {len(secret)} characters, want 50+"
    assert secret != example.get("DJANGO_SECRET_KEY"), ".env kept the example secret key"
    if "POSTGRES_PASSWORD" in example:
        assert generated.get("POSTGRES_PASSWORD") != example["POSTGRES_PASSWORD"], (
            ".env kept the example POSTGRES_PASSWORD"
        )


def test_env_file_is_git_ignored(baked: Bake) -> None:
    patterns = {
        line.strip()
        for line in (baked.project / ".gitignore").read_text(encoding="utf-8").splitlines()
    }
    assert patterns & {".env", "/.env", ".env*", "/.env*"}, ".gitignore does not ignore .env"


def _dotenv(path: Path) -> dict[str, str]:
    """Read a dotenv file with django-environ, as the bake's settings do, into a dict."""

    class Values(environ.Env):
        ENVIRON: dict[str, str] = {}  # noqa: RUF012 - a class of its own per call

    Values.read_env(path, overwrite=True)
    return Values.ENVIRON


# --- processes --------------------------------------------------------------------------------


def test_bin_scripts_are_executable(baked: Bake) -> None:
    scripts = sorted((baked.project / "bin").glob("*"))
    assert scripts, "bin/ is empty"
    not_executable = [script.name for script in scripts if not script.stat().st_mode & stat.S_IXUSR]
    assert not not_executable, f"bin scripts without the execute bit: {not_executable}"


def test_procfile_process_types_follow_the_options(baked: Bake) -> None:
    processes = project_processes(baked.project).procfile_commands(baked.project / "Procfile")
    missing = [name for name in ALWAYS_PROCESSES if name not in processes]
    assert not missing, f"Procfile lacks {missing}; it has {sorted(processes)}"
    for name, option in PROCESS_WHEN:
        wanted = baked.answers[option] == "y"
        assert (name in processes) == wanted, (
            f"Procfile should {'have' if wanted else 'not have'} a {name!r} process"
            f" when {option}={baked.answers[option]}; it has {sorted(processes)}"
        )


def test_procfile_commands_run_shipped_executables(baked: Bake) -> None:
    processes = project_processes(baked.project).procfile_commands(baked.project / "Procfile")
    broken = []
    for name, command in processes.items():
        program = command.split()[0]
        if "/" in program:
            path = baked.project / program
            if not (path.is_file() and path.stat().st_mode & stat.S_IXUSR):
                broken.append(f"{name}: {program} is not an executable file in the project")
    assert not broken, "Procfile commands that cannot run: " + "; ".join(broken)


# --- code quality -----------------------------------------------------------------------------


def test_python_files_compile(baked: Bake) -> None:
    errors = []
    for path in sorted(baked.project.rglob("*.py")):
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as error:
            errors.append(f"{path.relative_to(baked.project)}:{error.lineno}: {error.msg}")
    assert not errors, "Python files that do not compile:\n" + "\n".join(errors)


def test_ruff_check_passes(baked: Bake) -> None:
    result = _run_tool([tool("ruff"), "check", "--no-cache", "."], baked.project)
    exit_code = result.returncode
    assert exit_code == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"


def test_ruff_format_leaves_nothing_to_change(baked: Bake) -> None:
    result = _run_tool([tool("ruff"), "format", "--check", "--no-cache", "."], baked.project)
    exit_code = result.returncode
    assert exit_code == 0, f"ruff format --check failed:\n{result.stdout}{result.stderr}"


# --- docker, CI and license -------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec(docker_baked: Bake) -> None:
    compose = docker_baked.project / "compose.yaml"
    assert compose.is_file(), "use_docker=y but compose.yaml is missing"
    result = _run_tool(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)],
        docker_baked.project,
    )
    exit_code = result.returncode
    assert exit_code == 0, f"compose.yaml is invalid:\n{result.stdout}{result.stderr}"


def test_compose_services_follow_the_options(docker_baked: Bake) -> None:
    import yaml  # noqa: PLC0415 - PyYAML comes with cookiecutter

    compose = yaml.safe_load((docker_baked.project / "compose.yaml").read_text(encoding="utf-8"))
    services = sorted(compose.get("services", {}))
    for word, option in (("beat", "use_celery_beat"), ("flower", "use_flower")):
        wanted = docker_baked.answers[option] == "y"
        present = any(word in service for service in services)
        assert present == wanted, (
            f"compose.yaml should {'have' if wanted else 'not have'} a {word} service when"
            f" {option}={docker_baked.answers[option]}; services: {services}"
        )


def test_compose_uses_the_chosen_postgres_version(docker_baked: Bake) -> None:
    text = (docker_baked.project / "compose.yaml").read_text(encoding="utf-8")
    version = docker_baked.answers["postgres_version"]
    assert f"postgres:{version}" in text, f"compose.yaml does not use the postgres:{version} image"


def test_dockerfile_uses_the_chosen_python_version(docker_baked: Bake) -> None:
    text = (docker_baked.project / "Dockerfile").read_text(encoding="utf-8")
    version = docker_baked.answers["python_version"]
    assert f"python:{version}" in text, f"Dockerfile does not build from a python:{version} image"


def _compose_services(baked: Bake) -> dict:
    import yaml  # noqa: PLC0415 - PyYAML comes with cookiecutter

    compose = yaml.safe_load((baked.project / "compose.yaml").read_text(encoding="utf-8"))
    return compose["services"]


def test_compose_builds_each_image_once_and_never_pulls_it(docker_baked: Bake) -> None:
    services = _compose_services(docker_baked)
    builders: dict[str, list[str]] = {}
    for name, service in services.items():
        if "build" in service:
            builders.setdefault(service["image"], []).append(name)
    twice = {image: names for image, names in builders.items() if len(names) > 1}
    assert not twice, f"images built by more than one service (built once per service): {twice}"
    pulled = [
        f"{name} (pull_policy {service.get('pull_policy')!r})"
        for name, service in services.items()
        if service.get("image") in builders
        and service.get("pull_policy") != ("build" if "build" in service else "never")
    ]
    assert not pulled, (
        f"services that would look for the project's own image in a registry: {pulled}"
    )


def test_compose_never_disables_a_health_check(docker_baked: Bake) -> None:
    # `healthcheck: disable: true` makes `docker compose up --wait` fail (docker/compose#13522).
    disabled = [
        name
        for name, service in _compose_services(docker_baked).items()
        if (service.get("healthcheck") or {}).get("disable")
    ]
    assert not disabled, f"services with a disabled health check: {disabled}"


def test_compose_publishes_ports_on_loopback_by_default(docker_baked: Bake) -> None:
    exposed = [
        f"{name}: {port}"
        for name, service in _compose_services(docker_baked).items()
        for port in service.get("ports", [])
        if not str(port).startswith(("127.0.0.1:", "${WEB_PUBLISH_ADDRESS:-127.0.0.1}:"))
    ]
    assert not exposed, f"ports published on every interface by default: {exposed}"


def test_dockerfile_needs_no_frontend_image_from_a_registry(docker_baked: Bake) -> None:
    # A `# syntax=` parser directive makes BuildKit pull a frontend image before each build.
    text = (docker_baked.project / "Dockerfile").read_text(encoding="utf-8")
    directives = []
    for line in text.splitlines():
        if not re.match(r"#\s*\w+\s*=", line):
            break
        directives.append(line)
    assert not any("syntax" in line.lower() for line in directives), (
        f"the Dockerfile asks for a frontend image: {directives}"
    )


def test_github_workflows_match_the_workflow_schema(github_baked: Bake) -> None:
    workflows = sorted((github_baked.project / ".github" / "workflows").glob("*.y*ml"))
    assert workflows, "ci_tool=github but .github/workflows/ has no workflow"
    result = _run_tool(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            *map(str, workflows),
        ],
        github_baked.project,
    )
    exit_code = result.returncode
    assert exit_code == 0, f"invalid GitHub workflow:\n{result.stdout}{result.stderr}"


def test_github_workflow_tests_on_the_chosen_python_version(github_baked: Bake) -> None:
    text = (github_baked.project / ".github" / "workflows" / "ci.yml").read_text(encoding="utf-8")
    version = github_baked.answers["python_version"]
    assert version in text, f"ci.yml never mentions Python {version}"


def test_license_is_the_chosen_one(licensed_baked: Bake) -> None:
    text = (licensed_baked.project / "LICENSE").read_text(encoding="utf-8")
    chosen = licensed_baked.answers["open_source_license"]
    assert LICENSE_MARKERS[chosen] in text, f"LICENSE does not read like {chosen}"
    if chosen != "Apache-2.0":
        author = licensed_baked.answers["author_name"]
        assert author in text, f"the {chosen} copyright line does not name {author!r}"


#: Code that needs the demo app: an import of it, a dotted path into its modules, or the app
#: label in settings. Plain strings such as task_name="demo" in test data are fine.
DEMO_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+demo\b|[\"']demo\.(?:tasks|apps|models|admin|views|urls)\b"
)
DEMO_APP_LABEL = re.compile(r"[\"']demo[\"']")


def test_nothing_refers_to_the_demo_app_without_it(no_demo_baked: Bake) -> None:
    references = []
    for path in sorted(no_demo_baked.project.rglob("*.py")):
        relative = path.relative_to(no_demo_baked.project)
        in_settings = relative.parts[:2] == ("config", "settings")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if DEMO_IMPORT.search(line) or (in_settings and DEMO_APP_LABEL.search(line)):
                references.append(f"{relative}:{number}: {line.strip()}")
    assert not references, "the demo app is gone but still referred to:\n" + "\n".join(references)


# --- lock files, type checking, pre-commit -----------------------------------------------------


def test_bake_installs_the_lock_pair_for_its_answers(baked: Bake) -> None:
    import lock  # noqa: PLC0415 - scripts/lock.py names the sets

    key = lock.HOOK.lock_key(baked.answers)
    for name in lock.HOOK.LOCK_FILES:
        installed = baked.project / name
        assert installed.is_file(), f"{name} is missing"
        assert installed.read_bytes() == (lock.STORE / key / name).read_bytes(), (
            f"{name} is not the {key} pair"
        )


def _pinned(path: Path, package: str) -> bool:
    text = path.read_text(encoding="utf-8")
    return re.search(rf"^{re.escape(package)}==", text, re.MULTILINE) is not None


def test_runtime_lock_has_flower_and_sentry_exactly_when_chosen(baked: Bake) -> None:
    for package, option in (("flower", "use_flower"), ("sentry-sdk", "use_sentry")):
        wanted = baked.answers[option] == "y"
        assert _pinned(baked.project / "requirements.txt", package) == wanted, (
            f"requirements.txt should {'' if wanted else 'not '}pin {package}"
            f" when {option}={baked.answers[option]}"
        )
    wanted = baked.answers["include_demo_tasks"] == "y"
    assert _pinned(baked.project / "requirements-dev.txt", "locust") == wanted, (
        "locust follows include_demo_tasks"
    )
    assert not _pinned(baked.project / "requirements.txt", "mypy"), "dev tools in the image lock"


def _make_recipe(makefile: str, target: str) -> list[str]:
    lines = makefile.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_pre_commit_runs_the_checks_of_make_lint(baked: Bake) -> None:
    import yaml  # noqa: PLC0415 - PyYAML comes with cookiecutter

    config = yaml.safe_load((baked.project / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    assert [repo["repo"] for repo in config["repos"]] == ["local"], (
        "pre-commit hooks must be local (the venv's tools): no repository to fetch"
    )
    entries = [hook["entry"] for hook in config["repos"][0]["hooks"]]
    lint = _make_recipe((baked.project / "Makefile").read_text(encoding="utf-8"), "lint")
    normalised = [line.replace("$(VENV)", ".venv").removesuffix(" .") for line in lint]
    assert [entry.removesuffix(" --force-exclude") for entry in entries] == normalised, (
        f"pre-commit runs {entries}, make lint runs {lint}"
    )


def test_dockerfile_and_ci_install_from_the_lock_files(baked: Bake) -> None:
    wiring = {
        name: (baked.project / name).read_text(encoding="utf-8")
        for name in ("Makefile", "Dockerfile", ".github/workflows/ci.yml")
        if (baked.project / name).is_file()
    }
    for name, text in wiring.items():
        for resolving in ("pip install -e", "--requirements pyproject.toml"):
            assert resolving not in text, f"{name} resolves pyproject.toml's ranges: {resolving}"
    assert (
        "pip sync --quiet --python $(PYTHON) --require-hashes requirements-dev.txt"
        in (wiring["Makefile"])
    )
    if "Dockerfile" in wiring:
        assert "uv pip sync --require-hashes requirements.txt" in wiring["Dockerfile"]
    if ".github/workflows/ci.yml" in wiring:
        assert "make install" in wiring[".github/workflows/ci.yml"]
