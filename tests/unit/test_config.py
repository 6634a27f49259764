"""network.json validation: every problem names the field and the fix."""

from __future__ import annotations

import json

import pytest

from runtime.core.compile import compile_policy
from runtime.core.config import ConfigError, NetworkConfig, RuleSpec, parse_config
from runtime.core.policy import Action, Mode, Reason, Request, make_rule

SRC = "/work/.copilot_here/network.json"


def problems(text: str) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert str(info.value).startswith(SRC + ": ")
    return [(p.pointer, p.message, p.fix) for p in info.value.problems]


def one(text: str) -> tuple[str, str, str]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_defaults() -> None:
    assert parse_config("{}", SRC) == NetworkConfig()
    cfg = NetworkConfig()
    assert (cfg.enabled, cfg.inherit_defaults, cfg.mode, cfg.log_to_file) == (
        False,
        True,
        "monitor",
        False,
    )


def test_full_config() -> None:
    cfg = parse_config(
        json.dumps(
            {
                "$schema": "x",
                "enabled": True,
                "mode": "enforce",
                "allowed_rules": [
                    {"host": "api.github.com", "allowed_paths": ["/repos/"], "methods": ["get"]}
                ],
            }
        ),
        SRC,
    )
    assert cfg.allowed_rules == (RuleSpec("api.github.com", ("/repos/",), ("GET",)),)


def test_json_syntax_error_has_line_and_column() -> None:
    pointer, message, fix = one('{\n  "enabled": true,\n}')
    assert pointer == ""
    assert "line 3, column 1" in message
    assert "JSON syntax" in fix


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("allowedHosts", "allowed_rules"),
        ("inheritDefaults", "inherit_defaults"),
        ("log_to_fiel", "log_to_file"),
        ("enable", "enabled"),
        ("mdoe", "mode"),
    ],
)
def test_unknown_key_suggests_closest(key: str, suggestion: str) -> None:
    pointer, message, fix = one(json.dumps({key: True}))
    assert pointer == "/" + key
    assert f'unknown key "{key}"' in message
    assert f'rename it to "{suggestion}"' in fix


def test_unknown_rule_key() -> None:
    pointer, _, fix = one('{"allowed_rules": [{"host": "a.com", "paths": ["/"]}]}')
    assert pointer == "/allowed_rules/0/paths"
    assert '"allowed_paths"' in fix


def test_wrong_types() -> None:
    pointer, message, fix = one('{"enabled": "true"}')
    assert (pointer, fix) == ("/enabled", 'write "enabled": true')
    assert "true or false" in message
    pointer, _, fix = one('{"allowed_rules": ["github.com"]}')
    assert pointer == "/allowed_rules/0" and '{"host": "github.com"}' in fix
    pointer, _, _ = one('{"allowed_rules": [{"host": "a.com", "allowed_paths": "/x/"}]}')
    assert pointer == "/allowed_rules/0/allowed_paths"


@pytest.mark.parametrize(
    ("host", "fix_contains"),
    [
        ("https://github.com/repos/", '{"host": "github.com", "allowed_paths": ["/repos/"]}'),
        ("github.com:443", '"host": "github.com"'),
        ("*", '"enabled": false'),
        ("*.com", "*.example.com"),
        ("*.co.uk", "*.example.co.uk"),
        ("api.*.com", "*.example.com"),
        ("*.198.18.0.1", '"host": "198.18.0.1"'),
    ],
)
def test_invalid_hosts_say_what_to_write(host: str, fix_contains: str) -> None:
    pointer, _, fix = one(json.dumps({"allowed_rules": [{"host": host}]}))
    assert pointer == "/allowed_rules/0/host"
    assert fix_contains in fix


def test_paths_and_methods() -> None:
    pointer, _, fix = one('{"allowed_rules": [{"host": "a.com", "allowed_paths": ["v1/"]}]}')
    assert (pointer, fix) == ("/allowed_rules/0/allowed_paths/0", 'write "/v1/"')
    _, _, fix = one('{"allowed_rules": [{"host": "a.com", "allowed_paths": ["/a/../b"]}]}')
    assert fix == 'write "/b"'
    _, _, fix = one('{"allowed_rules": [{"host": "a.com", "allowed_paths": ["/s?q=1"]}]}')
    assert fix == 'write "/s"'
    pointer, _, _ = one('{"allowed_rules": [{"host": "a.com", "methods": ["FETCH"]}]}')
    assert pointer == "/allowed_rules/0/methods/0"


def test_every_problem_reported_at_once() -> None:
    found = problems('{"enabled": 1, "mode": "x", "allowed_rules": [{"host": "*"}, {}]}')
    assert [p[0] for p in found] == [
        "/enabled",
        "/mode",
        "/allowed_rules/0/host",
        "/allowed_rules/1",
    ]


# -- the behaviour matrix (README) ---------------------------------------------

BUILT_IN = (make_rule("github.com"), make_rule("api.github.com"))


def matrix_policy(enabled: bool, mode: str, log: bool):
    cfg = NetworkConfig(
        enabled=enabled, mode=mode, log_to_file=log, allowed_rules=(RuleSpec("example.com"),)
    )
    return compile_policy(cfg, SRC, BUILT_IN)


@pytest.mark.parametrize(
    ("enabled", "mode", "log", "policy_mode", "logs", "blocks"),
    [
        (False, "monitor", False, Mode.ALLOW_ALL, False, False),
        (False, "enforce", False, Mode.ALLOW_ALL, False, False),
        (False, "monitor", True, Mode.ALLOW_ALL, True, False),
        (True, "monitor", False, Mode.MONITOR, True, False),
        (True, "monitor", True, Mode.MONITOR, True, False),
        (True, "enforce", False, Mode.ENFORCE, False, True),
        (True, "enforce", True, Mode.ENFORCE, True, True),
    ],
)
def test_behaviour_matrix(enabled, mode, log, policy_mode, logs, blocks) -> None:
    p = matrix_policy(enabled, mode, log)
    assert p.mode is policy_mode
    assert p.log_to_file is logs
    d = p.decide(Request("GET", "/", sni="evil.test"))
    assert d.blocked is blocks
    assert d.violation is (policy_mode is Mode.MONITOR)
    assert p.decide(Request("GET", "/", sni="example.com")).action is Action.ALLOW


def test_inherit_defaults_user_rule_replaces_built_in_for_its_host() -> None:
    cfg = NetworkConfig(
        enabled=True,
        mode="enforce",
        allowed_rules=(RuleSpec("api.github.com", ("/repos/",)), RuleSpec("example.com")),
    )
    p = compile_policy(cfg, SRC, BUILT_IN)
    assert [(r.host, r.origin.label) for r in p.rules] == [
        ("api.github.com", SRC),
        ("example.com", SRC),
        ("github.com", "built-in"),
    ]
    assert p.decide(Request("GET", "/admin", sni="api.github.com")).reason is (
        Reason.PATH_NOT_ALLOWED
    )
    no_inherit = compile_policy(
        NetworkConfig(enabled=True, inherit_defaults=False, allowed_rules=cfg.allowed_rules),
        SRC,
        BUILT_IN,
    )
    assert [r.host for r in no_inherit.rules] == ["api.github.com", "example.com"]


def test_user_rules_are_never_dropped() -> None:
    specs = (
        *(RuleSpec(f"h{i}.example.com") for i in range(50)),
        RuleSpec("github.com", ("/a/",)),
        RuleSpec("github.com", ("/b/",), ("POST",)),
    )
    p = compile_policy(NetworkConfig(enabled=True, allowed_rules=specs), SRC, BUILT_IN)
    assert len([r for r in p.rules if r.origin.kind == "user"]) == len(specs)
    assert p.decide(Request("POST", "/b/x", sni="github.com")).reason is Reason.RULE_MATCH


def test_built_in_rules_are_validated_like_user_rules() -> None:
    from runtime.core.compile import built_in_rules

    rules = built_in_rules([{"host": "GitHub.com"}, {"host": "*.x.test", "methods": ["get"]}])
    assert [r.host for r in rules] == ["github.com", "*.x.test"]
    with pytest.raises(ConfigError) as err:
        built_in_rules([{"host": "ok.test"}, {"host": "*"}, {"host": "a.test", "paths": []}])
    text = str(err.value)
    assert text.startswith("built-in defaults: /allowed_rules/1/host")
    assert '/allowed_rules/2/paths: unknown key "paths"' in text


@pytest.mark.parametrize(
    ("path", "fix"),
    [
        ("*", 'write "allowed_paths": [] (an empty list allows every path)'),
        ("/*", 'write "allowed_paths": [] (an empty list allows every path)'),
        ("/v3/*x", 'for a prefix write "/v3/"'),
        ("/repos/o/r*", 'write "/repos/o/r" (it covers /repos/o/r and everything below it)'),
    ],
)
def test_star_paths_get_the_native_form(path: str, fix: str) -> None:
    doc = {"allowed_rules": [{"host": "a.test", "allowed_paths": [path]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(doc), "f.json")
    assert fix in str(err.value)


def test_whole_segment_wildcards_are_valid() -> None:
    doc = {"allowed_rules": [{"host": "a.test", "allowed_paths": ["/*/*/info/refs", "/x/*/"]}]}
    assert parse_config(json.dumps(doc), "f.json").allowed_rules[0].allowed_paths


def test_placeholders_are_filled_and_rules_without_values_drop_out() -> None:
    from runtime.core.compile import built_in_rules
    from runtime.core.placeholders import placeholder_values

    doc = {
        "enabled": True,
        "mode": "enforce",
        "inherit_defaults": False,
        "allowed_rules": [
            {
                "host": "api.github.com",
                "allowed_paths": ["/repos/{{GITHUB_OWNER}}/{{GITHUB_REPO}}/"],
            },
            {"host": "api.github.com", "allowed_paths": ["/user"]},
        ],
    }
    config = parse_config(json.dumps(doc), "f.json")
    values = placeholder_values("octo-org", "my.repo")
    policy = compile_policy(config, "f.json", values=values)
    assert [e.text for r in policy.rules for e in r.allowed_paths] == [
        "/repos/octo-org/my.repo/",
        "/user",
    ]
    without = compile_policy(config, "f.json", values=placeholder_values(None, None))
    assert [e.text for r in without.rules for e in r.allowed_paths] == ["/user"]
    # Only the paths without values drop out; a rule left with none never widens.
    partial = built_in_rules(
        [{"host": "a.test", "allowed_paths": ["/x", "/r/{{GITHUB_REPO}}"]}], values={}
    )
    assert [e.text for e in partial[0].allowed_paths] == ["/x"]
    assert built_in_rules([{"host": "a.test", "allowed_paths": ["/r/{{GITHUB_REPO}}"]}]) == ()
    built = built_in_rules([{"host": "{{GITHUB_OWNER}}.github.io"}], values=values)
    assert [r.host for r in built] == ["octo-org.github.io"]
    assert built_in_rules([{"host": "{{GITHUB_OWNER}}.github.io"}]) == ()


@pytest.mark.parametrize("owner", ["..", "a/b", "-x", "a" * 40, "", "o%2f"])
def test_placeholder_values_refuse_what_github_would_not_name(owner: str) -> None:
    from runtime.core.placeholders import placeholder_values

    assert "GITHUB_OWNER" not in placeholder_values(owner, "repo")
    assert placeholder_values("ok", "..") == {"GITHUB_OWNER": "ok"}


def test_unknown_placeholder_names_the_known_ones() -> None:
    doc = {"allowed_rules": [{"host": "a.test", "allowed_paths": ["/r/{{GITHUB_ORG}}/"]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(doc), "f.json")
    assert "unknown placeholder {{GITHUB_ORG}}" in str(err.value)
    assert "{{GITHUB_OWNER}} or {{GITHUB_REPO}}" in str(err.value)


@pytest.mark.parametrize(
    "key", ["allow_private", "allowPrivateAddresses", "allow-private-ips", "allow_private_adresses"]
)
def test_allow_private_addresses_did_you_mean(key: str) -> None:
    pointer, message, fix = one(json.dumps({"allowed_rules": [{"host": "a.test", key: True}]}))
    assert pointer == f"/allowed_rules/0/{key}" and f'unknown key "{key}"' in message
    assert fix == 'rename it to "allow_private_addresses"'


def test_allow_private_addresses_must_be_a_boolean() -> None:
    rule = {"host": "a.test", "allow_private_addresses": "yes"}
    pointer, message, fix = one(json.dumps({"allowed_rules": [rule]}))
    assert pointer == "/allowed_rules/0/allow_private_addresses"
    assert "true or false" in message and fix == 'write "allow_private_addresses": true'
    cfg = parse_config(json.dumps({"allowed_rules": [{"host": "a.test"}]}), SRC)
    assert cfg.allowed_rules[0].allow_private_addresses is False


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize(("value", "workers"), [(1, 1), (4, 4), (16, 16), ("auto", None)])
def test_workers_is_a_number_or_auto(value: object, workers: int | None) -> None:
    assert parse_config(json.dumps({"workers": value}), "n.json").workers == workers
    assert parse_config("{}", "n.json").workers is None  # the default: auto


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("2", 'write "workers": 2 (a number, not a string)'),
        (0, 'write "workers": 1'),
        (99, 'write "workers": 16'),
        (2.5, 'write "workers": 2'),
        (True, 'write "workers": "auto"'),
        ("many", 'write "workers": "auto"'),
    ],
)
def test_bad_workers_name_file_field_and_fix(value: object, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps({"workers": value}), "/w/network.json")
    text = str(err.value)
    assert text.startswith('/w/network.json: /workers: must be "auto" or a whole number'), text
    assert f"Fix: {fix}" in text, text


@pytest.mark.parametrize("key", ["worker", "numprocs", "processes"])
def test_workers_did_you_mean(key: str) -> None:
    with pytest.raises(
        ConfigError, match=f'/{key}: unknown key "{key}". Fix: rename it to "workers"'
    ):
        parse_config(json.dumps({key: 2}), "n.json")
