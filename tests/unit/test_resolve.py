"""Config resolution: repo wins outright, else global, else built-in defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.core.config import ConfigError
from runtime.core.policy import Mode, Policy
from runtime.policyfile import read_policy, write_policy
from runtime.resolve import (
    BUILT_IN,
    GLOBAL,
    REPO,
    load_built_in,
    resolve,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The shipped config dir, with registry hosts recorded as the installer would."""
    target = tmp_path / "share"
    shutil.copytree(ROOT / "config", target)
    (target / "registries.json").write_text(
        json.dumps({"npm": ["npm.registry.test"], "pypi": ["pypi.test", "files.pypi.test"]})
    )
    return target


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "project", tmp_path / "home"


REPO_CFG = {"enabled": True, "mode": "enforce", "allowed_rules": [{"host": "repo.test"}]}
GLOBAL_CFG = {"enabled": True, "mode": "monitor", "allowed_rules": [{"host": "global.test"}]}


@pytest.mark.parametrize(
    ("has_repo", "has_global", "kind"),
    [(True, True, REPO), (True, False, REPO), (False, True, GLOBAL), (False, False, BUILT_IN)],
)
def test_resolution_matrix(dirs, share, has_repo, has_global, kind) -> None:
    project, home = dirs
    if has_repo:
        write(project / ".copilot_here/network.json", REPO_CFG)
    if has_global:
        write(home / ".copilot_here/network.json", GLOBAL_CFG)
    resolved = resolve(project, home, share)
    assert resolved.kind == kind
    hosts = {r.host for r in resolved.policy.rules if r.origin.kind == "user"}
    if kind == REPO:
        assert hosts == {"repo.test"}, "repo config wins outright, no merge with global"
        assert resolved.policy.mode is Mode.ENFORCE
    elif kind == GLOBAL:
        assert hosts == {"global.test"}
        assert resolved.policy.mode is Mode.MONITOR
    else:
        assert resolved.path is None and resolved.source == "built-in defaults"
        assert resolved.policy.mode is Mode.ALLOW_ALL
        assert resolved.policy.log_to_file is False


def test_broken_repo_config_is_an_error_not_a_fallback(dirs, share) -> None:
    project, home = dirs
    write(project / ".copilot_here/network.json", '{"enabled": tru}')
    write(home / ".copilot_here/network.json", GLOBAL_CFG)
    with pytest.raises(ConfigError) as info:
        resolve(project, home, share)
    assert str(project / ".copilot_here/network.json") in str(info.value)


def test_inherited_defaults_include_registries(dirs, share) -> None:
    project, home = dirs
    write(project / ".copilot_here/network.json", REPO_CFG)
    rules = resolve(project, home, share).policy.rules
    built_in = {r.host for r in rules if r.origin.kind == "built-in"}
    assert {
        "github.com",
        "api.github.com",
        "ghcr.io",
        "api.githubcopilot.com",
        "api.business.githubcopilot.com",
        "npm.registry.test",
        "pypi.test",
        "files.pypi.test",
    } <= built_in
    assert {r.host for r in load_built_in(share)} == built_in


def test_policy_file_round_trip_and_atomic(tmp_path: Path, dirs, share) -> None:
    project, home = dirs
    write(project / ".copilot_here/network.json", REPO_CFG)
    policy = resolve(project, home, share).policy
    target = write_policy(policy, tmp_path / "run" / "policy.json")
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert read_policy(target).to_json() == policy.to_json()
    assert [p.name for p in target.parent.iterdir()] == ["policy.json"]
    assert isinstance(read_policy(target), Policy)


def test_registry_rules_are_read_only_and_reach_a_private_mirror(dirs, share) -> None:
    """The image's builder chose the registry hosts: a mirror on 10.x stays reachable."""
    project, home = dirs
    write(project / ".copilot_here/network.json", REPO_CFG)
    rules = [r for r in resolve(project, home, share).policy.rules if r.host == "npm.registry.test"]
    assert [(sorted(r.methods or ()), r.allow_private_addresses) for r in rules] == [
        (["GET", "HEAD"], True)
    ]
