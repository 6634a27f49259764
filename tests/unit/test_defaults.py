"""The built-in rules give the Copilot CLI and git what they need, and no more.

Decided by the real core over the shipped config/defaults.json, with the
project's repository octo-org/proj filled in (and without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.core.config import built_in_rules, placeholder_values
from runtime.core.policy import Mode, Policy, Request

DEFAULTS = json.loads((Path(__file__).parents[2] / "config" / "defaults.json").read_text())


def policy(owner: str | None = "octo-org", repo: str | None = "proj") -> Policy:
    rules = built_in_rules(DEFAULTS["allowed_rules"], values=placeholder_values(owner, repo))
    return Policy.build(Mode.ENFORCE, False, rules, "built-in defaults")


def allowed(p: Policy, method: str, host: str, path: str) -> bool:
    return not p.decide(Request(method=method, path=path, sni=host, host_header=host)).blocked


@pytest.mark.parametrize(
    ("method", "host", "path"),
    [
        ("GET", "api.github.com", "/copilot_internal/user"),  # the Copilot CLI's first request
        ("GET", "api.github.com", "/user"),
        ("POST", "api.github.com", "/graphql"),
        ("GET", "api.github.com", "/repos/octo-org/proj/pulls"),
        ("POST", "api.github.com", "/repos/octo-org/proj/issues"),
        ("GET", "github.com", "/anyone/anything.git/info/refs"),
        ("POST", "github.com", "/anyone/anything.git/git-upload-pack"),
        ("POST", "github.com", "/octo-org/proj.git/git-receive-pack"),
        ("POST", "github.com", "/octo-org/proj/git-receive-pack"),
        ("POST", "api.githubcopilot.com", "/chat/completions"),
        ("GET", "api.individual.githubcopilot.com", "/models"),
        ("GET", "ghcr.io", "/v2/org/image/manifests/latest"),
    ],
)
def test_what_the_copilot_cli_and_git_need_is_allowed(method: str, host: str, path: str) -> None:
    assert allowed(policy(), method, host, path)


@pytest.mark.parametrize(
    ("method", "host", "path"),
    [
        ("POST", "github.com", "/attacker/drop.git/git-receive-pack"),  # push elsewhere
        ("POST", "github.com", "/octo-org/proj-fork.git/git-receive-pack"),
        ("POST", "api.github.com", "/gists"),  # a gist
        ("POST", "gist.github.com", "/"),
        ("POST", "api.github.com", "/repos/other/repo/issues"),  # an issue elsewhere
        ("PUT", "api.github.com", "/repos/other/repo/contents/x"),
        ("GET", "api.github.com", "/repos/other/repo"),  # reads only of the project
        ("DELETE", "api.github.com", "/user"),
        ("POST", "api.github.com", "/user/repos"),  # create a repository
        ("PUT", "ghcr.io", "/v2/org/image/manifests/latest"),  # push an image
        ("POST", "uploads.github.com", "/repos/octo-org/proj/releases/1/assets"),
        ("GET", "github.com", "/octo-org/proj/archive/main.zip"),
    ],
)
def test_writes_elsewhere_are_refused(method: str, host: str, path: str) -> None:
    assert not allowed(policy(), method, host, path)


def test_without_a_github_remote_the_project_rules_drop_out() -> None:
    p = policy(None, None)
    assert not allowed(p, "POST", "github.com", "/octo-org/proj.git/git-receive-pack")
    assert not allowed(p, "POST", "api.github.com", "/repos/octo-org/proj/issues")
    assert allowed(p, "GET", "api.github.com", "/copilot_internal/user")
    assert allowed(p, "POST", "api.githubcopilot.com", "/chat/completions")
    assert allowed(p, "GET", "github.com", "/anyone/anything/info/refs")


def test_every_default_rule_is_scoped() -> None:
    """No built-in rule allows every path with every method on a GitHub host."""
    for rule in built_in_rules(DEFAULTS["allowed_rules"], values=placeholder_values("o", "r")):
        assert rule.allowed_paths or rule.methods is not None, rule
