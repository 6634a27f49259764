"""copilot_here's Airlock network.json read as the native model (runtime.core.airlock),
with the two core additions it needs: exact path entries ('=') and a rule's schemes.

The corpus in tests/corpus/airlock/ is taken from copilot_here's defaults and
documentation (registry hosts renamed to test names), plus one file of edge forms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.core import airlock
from runtime.core.compile import built_in_rules, compile_policy
from runtime.core.config import AIRLOCK, NATIVE, ConfigError, parse_config
from runtime.core.policy import Mode, Policy, Reason, Request, make_rule

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "airlock"
VALUES = {"GITHUB_OWNER": "octo", "GITHUB_REPO": "proj"}


def load(name: str, built_in=()) -> Policy:
    path = CORPUS / name
    config = parse_config(path.read_text(), str(path))
    assert config.format == AIRLOCK
    return compile_policy(config, str(path), built_in, VALUES)


def decide(policy: Policy, url: str, method: str = "GET") -> Reason:
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    request = Request(
        method=method,
        path="/" + path,
        scheme=scheme,
        port=443 if scheme == "https" else 80,
        sni=host if scheme == "https" else None,
        host_header=host,
    )
    return policy.decide(request).reason


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.json")), ids=lambda p: p.name)
def test_every_corpus_file_is_recognised_and_maps_to_a_valid_native_file(path: Path) -> None:
    data = json.loads(path.read_text())
    assert airlock.is_airlock(data) or "inherit_default_rules" not in data
    config = parse_config(path.read_text(), str(path), airlock=True)
    assert config.format == AIRLOCK
    # The native equivalent is a native file that means the same.
    again = parse_config(json.dumps(config.native), "native")
    assert again.format == NATIVE
    assert again.allowed_rules == config.allowed_rules
    assert (again.mode, again.enabled, again.log_to_file, again.inherit_defaults) == (
        config.mode,
        config.enabled,
        config.log_to_file,
        config.inherit_defaults,
    )


def test_default_rules_exact_paths_raw_prefixes_and_https_only() -> None:
    policy = load("default-airlock-rules.json")
    assert policy.mode is Mode.ENFORCE  # no mode in the file: copilot_here's CLI writes enforce
    ok = Reason.RULE_MATCH
    assert decide(policy, "https://api.github.com/user") is ok
    assert decide(policy, "https://api.github.com/user?x=1") is ok  # query stripped, as there
    # Exact there: not what lies below, not with a trailing slash.
    assert decide(policy, "https://api.github.com/user/repos") is Reason.PATH_NOT_ALLOWED
    assert decide(policy, "https://api.github.com/user/") is Reason.PATH_NOT_ALLOWED
    # "/repos/{{GITHUB_OWNER}}/{{GITHUB_REPO}}*": the repository and below it ...
    assert decide(policy, "https://api.github.com/repos/octo/proj") is ok
    assert decide(policy, "https://api.github.com/repos/octo/proj/pulls/1") is ok
    # ... never the raw prefix's other repositories (narrower than Airlock) or escapes.
    assert decide(policy, "https://api.github.com/repos/octo/proj-evil") is Reason.PATH_NOT_ALLOWED
    assert decide(policy, "https://api.github.com/repos/octo/proj/../../x") is (
        Reason.PATH_NOT_ALLOWED
    )
    # allow_insecure absent: plain HTTP refused for the host.
    assert decide(policy, "http://api.github.com/user") is Reason.SCHEME_NOT_ALLOWED
    assert decide(policy, "https://api.githubcopilot.com/chat/completions", "POST") is ok
    assert decide(policy, "https://evil.test/") is Reason.HOST_NOT_ALLOWED


def test_readme_example_and_cli_written_file() -> None:
    policy = load("readme-example.json")
    assert policy.mode is Mode.ENFORCE and not policy.log_to_file
    assert decide(policy, "https://api.github.com/graphql", "POST") is Reason.RULE_MATCH
    assert decide(policy, "https://api.github.com/meta") is Reason.PATH_NOT_ALLOWED
    assert load("cli-written.json").mode is Mode.ALLOW_ALL  # enabled false: allow-all


def test_project_file_star_and_segment_prefixes() -> None:
    policy = load("project-network.json")
    assert policy.log_to_file
    assert decide(policy, "https://nuget.registry.test/v3/index.json") is Reason.RULE_MATCH
    assert decide(policy, "https://nuget.registry.test/v3") is Reason.PATH_NOT_ALLOWED
    assert decide(policy, "https://nuget.registry.test/v4/x") is Reason.PATH_NOT_ALLOWED
    assert decide(policy, "https://crates.registry.test/anything/at/all") is Reason.RULE_MATCH
    assert decide(policy, "http://crates.registry.test/x") is Reason.SCHEME_NOT_ALLOWED


def test_edge_forms_map_to_the_narrower_reading_and_say_so() -> None:
    path = CORPUS / "edge-forms.json"
    config = parse_config(path.read_text(), str(path))
    notes = "\n".join(config.notes)
    built_in = built_in_rules([{"host": "api.github.com"}, {"host": "ghcr.io"}])
    policy = compile_policy(config, str(path), built_in, VALUES)
    # [] is no path there; with inherit_default_rules the built-in rule stays replaced.
    assert config.native["allowed_rules"][0] == {"host": "api.github.com", "schemes": []}
    assert decide(policy, "https://api.github.com/user") is Reason.SCHEME_NOT_ALLOWED
    assert decide(policy, "https://ghcr.io/v2/") is Reason.RULE_MATCH  # other built-ins stay
    assert "/allowed_rules/0: no path allowed for api.github.com" in notes
    # allow_insecure: both schemes.
    assert decide(policy, "http://plain.test/x") is Reason.RULE_MATCH
    # A host with '*' matches nothing in Airlock: dropped.
    assert decide(policy, "https://a.wild.test/") is Reason.HOST_NOT_ALLOWED
    assert '/allowed_rules/2: host "*.wild.test"' in notes
    # Raw prefix, a literal '*' and a query never match as written there: narrower/dropped.
    assert config.native["allowed_rules"][2]["allowed_paths"] == ["/docs", "=/exact"]
    assert decide(policy, "https://example.com/docs/x") is Reason.RULE_MATCH
    assert decide(policy, "https://example.com/docs-old") is Reason.PATH_NOT_ALLOWED
    assert decide(policy, "https://example.com/exact") is Reason.RULE_MATCH
    assert decide(policy, "https://example.com/q") is Reason.PATH_NOT_ALLOWED
    assert '/allowed_rules/3/allowed_paths/1: "/a/*/b"' in notes
    # The second rule for the same host (any case, trailing dot) is not used there.
    assert len(config.native["allowed_rules"]) == 3
    assert "/allowed_rules/4: a second rule for EXAMPLE.com." in notes
    # No mode: enforce, noted.
    assert policy.mode is Mode.ENFORCE and '/mode: not set; read as "enforce"' in notes


def test_without_inheritance_an_empty_rule_is_dropped() -> None:
    text = json.dumps(
        {"enabled": True, "inherit_default_rules": False, "allowed_rules": [{"host": "a.test"}]}
    )
    config = parse_config(text, "x")
    assert config.native["allowed_rules"] == [] and config.allowed_rules == ()


@pytest.mark.parametrize(
    ("data", "pointer", "fix"),
    [
        ({"enable_logging": "yes"}, "/enable_logging", '"enable_logging": true'),
        ({"enable_logging": True, "mode": "block"}, "/mode", '"monitor" or "enforce"'),
        ({"enable_logging": True, "log_to_file": True, "x": 1}, "/enable_logging", "log_to_file"),
        ({"inherit_default_rules": True, "rules": []}, "/rules", "allowed_rules"),
        (
            {"inherit_default_rules": True, "allowed_rules": [{"host": "https://a.test/x"}]},
            "/allowed_rules/0/host",
            '{"host": "a.test", "allowed_paths": ["/x"]}',
        ),
        (
            {"enable_logging": True, "allowed_rules": [{"host": "a.test", "allow_insecure": 1}]},
            "/allowed_rules/0/allow_insecure",
            "true or false",
        ),
    ],
)
def test_problems_name_the_airlock_field_and_the_fix(data, pointer: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(data), "f.json")
    text = str(info.value)
    assert f"f.json: {pointer}:" in text and fix in text, text


def test_native_hints_for_airlock_names() -> None:
    """A native file (it has our keys) with Airlock's names gets the native fix."""
    cases = [
        ({"log_to_file": True, "enable_logging": True}, "/enable_logging", 'to "log_to_file"'),
        (
            {"inherit_defaults": True, "inherit_default_rules": True},
            "/inherit_default_rules",
            'to "inherit_defaults"',
        ),
        (
            {"allowed_rules": [{"host": "a.test", "methods": ["GET"], "allow_insecure": True}]},
            "/allowed_rules/0/allow_insecure",
            '"schemes": ["http", "https"]',
        ),
        (
            {"log_to_file": True, "allowed_rules": [{"host": "a.test", "allowed_paths": ["*"]}]},
            "/allowed_rules/0/allowed_paths/0",
            'write "allowed_paths": []',
        ),
    ]
    for data, pointer, fix in cases:
        with pytest.raises(ConfigError) as info:
            parse_config(json.dumps(data), "n.json")
        text = str(info.value)
        assert f"n.json: {pointer}:" in text and fix in text, text


def test_at_airlocks_own_location_our_names_are_the_mistake() -> None:
    with pytest.raises(ConfigError, match='rename it to "enable_logging"'):
        parse_config('{"log_to_file": true}', "g.json", airlock=True)


def test_exact_entries_and_schemes_in_the_core() -> None:
    rule = make_rule("a.test", ["=/user", "/repos/"], schemes=["HTTPS"])
    policy = Policy.build(Mode.ENFORCE, False, [rule], "t")
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))).rules == (rule,)

    def reason(path: str, scheme: str = "https") -> Reason:
        return decide(policy, f"{scheme}://a.test{path}")

    assert reason("/user") is Reason.RULE_MATCH
    assert reason("/./user") is Reason.RULE_MATCH  # judged on the normalised path
    assert reason("/user/x") is Reason.PATH_NOT_ALLOWED
    assert reason("/user%2f..%2fx") is Reason.PATH_NOT_ALLOWED  # every reading
    assert reason("/user", "http") is Reason.SCHEME_NOT_ALLOWED
    nothing = Policy.build(Mode.ENFORCE, False, [make_rule("b.test", schemes=[])], "t")
    assert decide(nothing, "https://b.test/") is Reason.SCHEME_NOT_ALLOWED
