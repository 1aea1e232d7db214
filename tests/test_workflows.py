"""GitHub workflows and Dependabot configurations: actions pinned by SHA, zizmor clean.

The template's own ``.github`` and that of every bake with ``ci_tool=github`` (the pairwise
cover and the default) are checked: each ``uses:`` names a full 40-character commit SHA with
the version it is in a comment (what Dependabot updates together), and zizmor, run offline,
reports nothing at medium severity or above.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from conftest import Bake, tool
from template_options import DEFAULT_ANSWERS, REPO_ROOT, case_id, pairwise_cases

#: ``owner/repo[/path]@<sha> # v1.2.3``: the pin and its version, nothing else.
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(?:/[\w./-]+)?@[0-9a-f]{40} # v\d+(?:\.\d+){0,2}$")
USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>.+?)\s*$")

GITHUB_BAKES = [
    pytest.param(case, id=case_id(case))
    for case in [{}, *pairwise_cases()]
    if (DEFAULT_ANSWERS | case)["ci_tool"] == "github"
]


def unpinned_uses(github_dir: Path) -> list[str]:
    """Every ``uses:`` under ``github_dir`` that is not a commit SHA with a version comment."""
    found = []
    for path in sorted(github_dir.rglob("*.y*ml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            match = USES.match(line)
            if match and not match["ref"].startswith("./") and not PINNED.match(match["ref"]):
                found.append(f"{path.relative_to(github_dir.parent)}:{number}: {match['ref']}")
    return found


def zizmor_findings(github_dir: Path) -> list[str]:
    """What zizmor (offline, default persona) finds at medium severity or above."""
    result = subprocess.run(
        [tool("zizmor"), "--offline", "--min-severity", "medium", "--format", "json", "."],
        cwd=github_dir.parent,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    try:
        findings = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"zizmor failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    described = []
    for finding in findings:
        where = finding["locations"][0]
        path = where["symbolic"]["key"].get("Local", {}).get("verbatim_path", "?")
        row = where["concrete"]["location"]["start_point"]["row"] + 1
        severity = finding["determinations"]["severity"]
        described.append(f"{path}:{row}: {finding['ident']} ({severity}): {finding['desc']}")
    return described


@pytest.fixture(params=GITHUB_BAKES)
def github_bake(request: pytest.FixtureRequest, bake: Callable[[Mapping[str, str]], Bake]) -> Bake:
    """A bake with GitHub CI."""
    return bake(request.param)


def test_template_workflows_pin_every_action_by_sha() -> None:
    unpinned = unpinned_uses(REPO_ROOT / ".github")
    assert not unpinned, "actions not pinned by commit SHA with a version comment:\n" + "\n".join(
        unpinned
    )


def test_template_workflows_are_zizmor_clean() -> None:
    findings = zizmor_findings(REPO_ROOT / ".github")
    assert not findings, "zizmor (medium and above):\n" + "\n".join(findings)


def test_baked_workflows_pin_every_action_by_sha(github_bake: Bake) -> None:
    unpinned = unpinned_uses(github_bake.project / ".github")
    assert not unpinned, "actions not pinned by commit SHA with a version comment:\n" + "\n".join(
        unpinned
    )


def test_baked_workflows_and_dependabot_are_zizmor_clean(github_bake: Bake) -> None:
    findings = zizmor_findings(github_bake.project / ".github")
    assert not findings, "zizmor (medium and above):\n" + "\n".join(findings)


def test_the_same_action_is_pinned_to_the_same_commit_everywhere(github_bake: Bake) -> None:
    pins: dict[str, set[str]] = {}
    for github_dir in (REPO_ROOT / ".github", github_bake.project / ".github"):
        for path in github_dir.rglob("*.y*ml"):
            for line in path.read_text(encoding="utf-8").splitlines():
                match = USES.match(line)
                if match and "@" in match["ref"]:
                    action, _, pin = match["ref"].partition("@")
                    pins.setdefault(action, set()).add(pin)
    mixed = {action: sorted(found) for action, found in pins.items() if len(found) > 1}
    assert not mixed, f"one action, several pins: {mixed}"


def test_dependabot_watches_actions_and_python_dependencies(github_bake: Bake) -> None:
    import yaml  # noqa: PLC0415 - PyYAML comes with cookiecutter

    for config_path in (
        REPO_ROOT / ".github" / "dependabot.yml",
        github_bake.project / ".github" / "dependabot.yml",
    ):
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        ecosystems = {update["package-ecosystem"] for update in config["updates"]}
        assert {"github-actions", "pip"} <= ecosystems, f"{config_path}: {sorted(ecosystems)}"
