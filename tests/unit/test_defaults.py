"""The built-in rules give the Copilot CLI and git what they need, and no more.

Decided by the real core over the shipped config/defaults.json, with the
project's repository octo-org/proj filled in (and without one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.core.compile import built_in_rules, compile_policy
from runtime.core.config import NetworkConfig, validate_config
from runtime.core.explain import explain
from runtime.core.placeholders import placeholder_values
from runtime.core.policy import Mode, Policy, Request, suggested_rules
from runtime.resolve import GITHUB_REPO_ENV, resolve, values_from_environ

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
    """No built-in rule allows every path with every method on a GitHub host (a rule
    that only opens ports allows no HTTP at all)."""
    for rule in built_in_rules(DEFAULTS["allowed_rules"], values=placeholder_values("o", "r")):
        assert rule.allowed_paths or rule.methods is not None or not rule.http, rule


# ---------------------------------------------------------------------------
# Through resolve: what the init, the reloader and the CLI compile


@pytest.fixture
def share(tmp_path: Path) -> Path:
    target = tmp_path / "share"
    shutil.copytree(Path(__file__).parents[2] / "config", target)
    (target / "registries.json").write_text(
        json.dumps({"npm": ["npm.registry.test"], "pypi": ["pypi.test", "files.pypi.test"]})
    )
    return target


def project_with(tmp_path: Path, config: dict) -> Path:
    project = tmp_path / "project"
    (project / ".copilot_here").mkdir(parents=True)
    (project / ".copilot_here" / "network.json").write_text(json.dumps(config))
    return project


ENFORCE_DEFAULTS = {"enabled": True, "mode": "enforce", "inherit_defaults": True}


def test_package_registries_are_read_only(tmp_path: Path, share: Path) -> None:
    project = project_with(tmp_path, ENFORCE_DEFAULTS)
    p = resolve(project, tmp_path / "home", share).policy
    for host in ("npm.registry.test", "pypi.test", "files.pypi.test"):
        assert allowed(p, "GET", host, "/some-package")
        assert allowed(p, "HEAD", host, "/some-package")
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert not allowed(p, method, host, "/-/npm/v1/security/advisories/bulk"), method


def test_values_fill_the_rules_and_the_note_says_so(tmp_path: Path, share: Path) -> None:
    project = project_with(tmp_path, ENFORCE_DEFAULTS)
    values = values_from_environ({GITHUB_REPO_ENV: "octo-org/proj"})
    r = resolve(project, tmp_path / "home", share, values)
    assert allowed(r.policy, "POST", "github.com", "/octo-org/proj.git/git-receive-pack")
    assert not allowed(r.policy, "POST", "github.com", "/attacker/drop.git/git-receive-pack")
    assert r.repository == "octo-org/proj" and r.unfilled == ()
    assert "github.com/{{GITHUB_OWNER}}/{{GITHUB_REPO}}/git-receive-pack" in r.templated
    assert "GitHub repository: octo-org/proj" in (r.repository_note() or "")


@pytest.mark.parametrize("environ", [{}, {GITHUB_REPO_ENV: ""}, {GITHUB_REPO_ENV: "a/b/c"}])
def test_without_values_the_rules_drop_out_and_the_note_says_so(
    tmp_path: Path, share: Path, environ: dict[str, str]
) -> None:
    project = project_with(tmp_path, ENFORCE_DEFAULTS)
    r = resolve(project, tmp_path / "home", share, values_from_environ(environ))
    assert not allowed(r.policy, "POST", "github.com", "/octo-org/proj.git/git-receive-pack")
    assert r.unfilled == r.templated and len(r.unfilled) >= 3
    assert (r.repository_note() or "").startswith("No GitHub repository")


def test_no_note_when_no_rule_in_force_names_the_repository(tmp_path: Path, share: Path) -> None:
    # inherit_defaults false: nothing names the placeholders, nothing to say.
    project = project_with(tmp_path, {**ENFORCE_DEFAULTS, "inherit_defaults": False})
    assert resolve(project, tmp_path / "home", share).repository_note() is None
    # A user rule replacing every built-in rule for github.com: only api.github.com's and
    # the Copilot API's rules still name the repository.
    cfg = {**ENFORCE_DEFAULTS, "allowed_rules": [{"host": "GitHub.com"}]}
    r = resolve(project_with(tmp_path / "b", cfg), tmp_path / "home", share)
    assert r.templated and not any(e.startswith("github.com/") for e in r.templated)


def test_user_rules_use_the_same_values(tmp_path: Path, share: Path) -> None:
    cfg = {
        "enabled": True,
        "mode": "enforce",
        "inherit_defaults": False,
        "allowed_rules": [{"host": "example.com", "allowed_paths": ["/{{GITHUB_OWNER}}/"]}],
    }
    project = project_with(tmp_path, cfg)
    values = values_from_environ({GITHUB_REPO_ENV: "octo-org/proj"})
    p = resolve(project, tmp_path / "home", share, values).policy
    assert allowed(p, "GET", "example.com", "/octo-org/x")
    assert not allowed(p, "GET", "example.com", "/other/x")
    assert resolve(project, tmp_path / "home", share).policy.rules == ()


# ---------------------------------------------------------------------------
# The 403's fix, over the defaults: several rules per host, methods restricted

NEEDED = [
    ("GET", "api.github.com", "/copilot_internal/user"),
    ("POST", "api.github.com", "/graphql"),
    ("PATCH", "api.github.com", "/repos/octo-org/proj/issues/1"),
    ("GET", "github.com", "/anyone/lib.git/info/refs"),
    ("POST", "github.com", "/anyone/lib.git/git-upload-pack"),
    ("POST", "github.com", "/octo-org/proj.git/git-receive-pack"),
    ("POST", "github.com", "/login/oauth/access_token"),
    ("HEAD", "ghcr.io", "/v2/org/image/manifests/latest"),
]


@pytest.mark.parametrize(
    ("method", "host", "path"),
    [
        ("POST", "github.com", "/attacker/drop.git/git-receive-pack"),  # path, 4 rules
        ("POST", "api.github.com", "/gists"),  # path, 3 rules
        ("POST", "api.github.com", "/user"),  # method, its rule GET/HEAD only
        ("PUT", "ghcr.io", "/v2/org/image/manifests/latest"),  # method, every path
        ("GET", "evil.test", "/x/y"),  # host
    ],
)
def test_the_suggested_fix_allows_the_request_and_keeps_the_defaults(
    method: str, host: str, path: str
) -> None:
    values = placeholder_values("octo-org", "proj")
    built_in = built_in_rules(DEFAULTS["allowed_rules"], values=values)
    before = compile_policy(NetworkConfig(enabled=True, mode=Mode.ENFORCE), "cfg", built_in, values)
    decision = before.decide(Request(method=method, path=path, sni=host, host_header=host))
    assert decision.blocked
    text = explain(decision, method, f"https://{host}{path}", "cfg")
    rules = suggested_rules(decision)
    listed = ", ".join(json.dumps(r) for r in rules)
    assert listed in text  # the text gives exactly these rules
    if decision.rule is not None and len(decision.host_rules) > 1:
        assert f"{len(decision.host_rules)} rules, none allows it" in text or (
            decision.reason.value == "method_not_allowed"
        )
    user = validate_config({"enabled": True, "mode": "enforce", "allowed_rules": rules}, "cfg")
    after = compile_policy(user, "cfg", built_in, values)
    assert allowed(after, method, host, path)
    for needed in NEEDED:  # nothing the defaults allowed is lost
        assert allowed(after, *needed), needed
    # As narrow as the request: the same write elsewhere stays refused.
    if method not in ("GET", "HEAD"):
        assert not allowed(after, method, host, "/someone-else/x")
