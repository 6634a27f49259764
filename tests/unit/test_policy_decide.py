"""Decisions: reasons, modes, methods, domain fronting, serialisation."""

from __future__ import annotations

import json
import time

from runtime.core.explain import explain
from runtime.core.paths import normalize_path
from runtime.core.policy import (
    Action,
    Mode,
    Origin,
    Policy,
    Reason,
    Request,
    make_rule,
    suggested_rule,
)

USER = Origin("user", "/work/.copilot_here/network.json")


def build(mode: Mode = Mode.ENFORCE, log: bool = False) -> Policy:
    return Policy.build(
        mode,
        log,
        [
            make_rule("api.github.com", ["/repos/", "/user"], origin=USER),
            make_rule("uploads.example.com", ["/v1/"], ["GET"], origin=USER),
            make_rule("uploads.example.com", ["/v1/"], ["PUT"], origin=USER),
            make_rule("github.com"),
        ],
        USER.file or "",
    )


def req(host: str, path: str = "/", method: str = "GET", **kw) -> Request:
    return Request(method, path, sni=host, host_header=host, **kw)


def test_enforce_reasons() -> None:
    p = build()
    cases = [
        (req("api.github.com", "/repos/a/b"), Action.ALLOW, Reason.RULE_MATCH),
        (req("api.github.com", "/user/repos"), Action.ALLOW, Reason.RULE_MATCH),
        (req("api.github.com", "/users"), Action.BLOCK, Reason.PATH_NOT_ALLOWED),
        (req("api.github.com", "/repos/../admin"), Action.BLOCK, Reason.PATH_NOT_ALLOWED),
        (req("evil.test"), Action.BLOCK, Reason.HOST_NOT_ALLOWED),
        (req("uploads.example.com", "/v1/x", "put"), Action.ALLOW, Reason.RULE_MATCH),
        (req("uploads.example.com", "/v1/x", "POST"), Action.BLOCK, Reason.METHOD_NOT_ALLOWED),
        (req("uploads.example.com", "/v2/x", "GET"), Action.BLOCK, Reason.PATH_NOT_ALLOWED),
    ]
    for request, action, reason in cases:
        d = p.decide(request)
        assert (d.action, d.reason) == (action, reason), request
        assert d.mode is Mode.ENFORCE


def test_decision_carries_rule_and_origin() -> None:
    d = build().decide(req("api.github.com", "/repos/x"))
    assert d.rule is not None
    assert d.rule.host == "api.github.com"
    assert d.rule.origin.label == "/work/.copilot_here/network.json"
    d = build().decide(req("github.com", "/x"))
    assert d.rule is not None and d.rule.origin.label == "built-in"


def test_monitor_never_blocks_but_flags() -> None:
    p = build(Mode.MONITOR)
    d = p.decide(req("evil.test"))
    assert d.action is Action.VIOLATION and not d.blocked and d.violation
    assert d.reason is Reason.HOST_NOT_ALLOWED
    assert d.log_action == "ALLOW"
    assert p.log_to_file, "monitor forces logging on"
    ok = p.decide(req("github.com"))
    assert ok.action is Action.ALLOW and not ok.violation


def test_allow_all_allows_everything_even_fronting() -> None:
    p = Policy.build(Mode.ALLOW_ALL, False, [make_rule("github.com")], "built-in defaults")
    assert p.rules == ()
    for request in (req("evil.test"), Request("GET", "/", sni="a.test", host_header="b.test")):
        d = p.decide(request)
        assert (d.action, d.reason) == (Action.ALLOW, Reason.ALLOW_ALL)


def test_domain_fronting_blocked() -> None:
    p = build()
    d = p.decide(Request("GET", "/", sni="github.com", host_header="evil.test"))
    assert (d.action, d.reason) == (Action.BLOCK, Reason.HOST_MISMATCH)
    # Same host with a port or different case is not fronting.
    d = p.decide(Request("GET", "/", sni="GitHub.com", host_header="github.com:443"))
    assert d.reason is Reason.RULE_MATCH
    m = build(Mode.MONITOR).decide(Request("GET", "/", sni="github.com", host_header="evil.test"))
    assert (m.action, m.reason) == (Action.VIOLATION, Reason.HOST_MISMATCH)


def test_judged_host_order() -> None:
    p = build()
    assert (
        p.decide(Request("GET", "/", sni="github.com", dialled="198.18.0.9")).host == "github.com"
    )
    d = p.decide(
        Request(
            "GET", "/", scheme="http", port=80, host_header="github.com:80", dialled="198.18.0.9"
        )
    )
    assert d.host == "github.com" and d.reason is Reason.RULE_MATCH
    d = p.decide(Request("GET", "/", dialled="198.18.0.9"))
    assert d.host == "198.18.0.9" and d.reason is Reason.HOST_NOT_ALLOWED
    d = p.decide(Request("GET", "/"))
    assert d.blocked and d.reason is Reason.HOST_NOT_ALLOWED


def test_garbage_host_header_is_blocked_not_crashing() -> None:
    d = build().decide(Request("GET", "/", host_header="exa mple..com"))
    assert d.blocked and d.reason is Reason.HOST_NOT_ALLOWED


def test_policy_json_round_trip() -> None:
    p = build(Mode.MONITOR)
    again = Policy.from_json(json.loads(json.dumps(p.to_json())))
    assert again.to_json() == p.to_json()
    assert again.rules == p.rules
    assert again.decide(req("api.github.com", "/users")).reason is Reason.PATH_NOT_ALLOWED


def test_suggestions() -> None:
    p = build()
    assert suggested_rule(p.decide(req("evil.test", "/v1/models"))) == {
        "host": "evil.test",
        "allowed_paths": ["/v1/"],
    }
    # A user's rules for the host stay as they are: one more rule, as narrow as the request.
    assert suggested_rule(p.decide(req("api.github.com", "/orgs/x"))) == {
        "host": "api.github.com",
        "allowed_paths": ["/orgs/"],
    }
    # The host's rules name methods: so does the suggestion.
    assert suggested_rule(p.decide(req("uploads.example.com", "/v2/x", "PUT"))) == {
        "host": "uploads.example.com",
        "allowed_paths": ["/v2/"],
        "methods": ["PUT"],
    }
    assert suggested_rule(p.decide(req("uploads.example.com", "/v1/x", "DELETE"))) == {
        "host": "uploads.example.com",
        "allowed_paths": ["/v1/"],
        "methods": ["DELETE"],
    }
    assert suggested_rule(p.decide(req("evil.test", "/"))) == {
        "host": "evil.test",
        "allowed_paths": ["/"],
    }


def test_explain_text_names_everything_an_agent_needs() -> None:
    d = build().decide(req("evil.test", "/v1/models?key=secret"))
    text = explain(d, "GET", "https://evil.test/v1/models", "/work/.copilot_here/network.json")
    assert text.startswith("BLOCKED: GET https://evil.test/v1/models\n")
    assert "host_not_allowed" in text
    assert "/work/.copilot_here/network.json" in text
    assert '{"host": "evil.test", "allowed_paths": ["/v1/"]}' in text


def test_backslash_must_be_allowed_under_both_readings() -> None:
    p = build()
    for path in ("/repos/..\\admin", "/repos/%5c..%5cadmin", "/repos\\x"):
        assert p.decide(req("api.github.com", path)).reason is Reason.PATH_NOT_ALLOWED, path
    assert p.decide(req("api.github.com", "/repos/a\\b")).reason is Reason.RULE_MATCH


def test_absolute_form_authority_must_agree_with_host_header() -> None:
    p = build()
    fronted = Request(
        "GET",
        "/repos/x",
        scheme="http",
        port=80,
        host_header="api.github.com",
        authority="evil.test",
    )
    d = p.decide(fronted)
    assert (d.action, d.reason) == (Action.BLOCK, Reason.HOST_MISMATCH)
    same = Request(
        "GET",
        "/repos/x",
        scheme="http",
        port=80,
        host_header="api.github.com",
        authority="API.github.com:80",
    )
    assert p.decide(same).reason is Reason.RULE_MATCH
    # HTTP/2: :authority is both the host header and the authority.
    h2 = Request(
        "GET",
        "/repos/x",
        sni="api.github.com",
        host_header="api.github.com",
        authority="api.github.com",
    )
    assert p.decide(h2).reason is Reason.RULE_MATCH
    # The authority alone names the host when nothing else does.
    only = Request("GET", "/", scheme="http", port=80, authority="github.com")
    assert p.decide(only).host == "github.com"


CLIMBING = [
    "/repos/x%2f..%2f..%2fadmin",
    "/repos/x%2F..%2F..%2Fadmin",
    "/repos/..%2fadmin",
    "/repos/%2e%2e%2fadmin",
    "/repos/x%5c..%5c..%5cadmin",
    "/repos/x%5C..%5C..%5Cadmin",
    "/repos/x\\..\\..\\admin",
    "/repos/x%2f..\\..%2fadmin",
    "/repos/x%252f..%252f..%252fadmin",
    "/repos/x%2f..%2f..%2fadmin?page=1",
]


def test_encoded_separators_cannot_climb_out_of_a_prefix() -> None:
    p = build()
    for path in CLIMBING:
        d = p.decide(req("api.github.com", path))
        assert (d.action, d.reason) == (Action.BLOCK, Reason.PATH_NOT_ALLOWED), path
        # Reported as what an upstream would serve, and the fix says so.
        assert d.path == "/admin", (path, d.path)
        assert suggested_rule(d)["allowed_paths"][-1] == "/admin"
    m = build(Mode.MONITOR).decide(req("api.github.com", CLIMBING[0]))
    assert (m.action, m.reason, m.path) == (Action.VIOLATION, Reason.PATH_NOT_ALLOWED, "/admin")


def test_encoded_separators_inside_a_prefix_are_allowed() -> None:
    p = build()
    for path in ("/repos/a%2fb", "/repos/a%5Cb", "/repos/a%252fb/c", "/repos/a%2f..%2fb"):
        d = p.decide(req("api.github.com", path))
        assert d.reason is Reason.RULE_MATCH, path
        assert d.path == normalize_path(path)


def test_every_reading_must_be_allowed_by_one_rule() -> None:
    # An exact entry spelled with %2f covers that spelling only; an upstream that
    # decodes it serves the other one, so both must be listed.
    one = Policy.build(Mode.ENFORCE, False, [make_rule("r.test", ["/@s%2fp"])], "t")
    assert one.decide(req("r.test", "/@s%2fp")).reason is Reason.PATH_NOT_ALLOWED
    both = Policy.build(Mode.ENFORCE, False, [make_rule("r.test", ["/@s%2fp", "/@s/p"])], "t")
    assert both.decide(req("r.test", "/@s%2fp")).reason is Reason.RULE_MATCH
    # Two rules that each cover one reading do not add up to one that covers both.
    split = Policy.build(
        Mode.ENFORCE,
        False,
        [make_rule("r.test", ["/@s%2fp"]), make_rule("r.test", ["/@s/p"])],
        "t",
    )
    assert split.decide(req("r.test", "/@s%2fp")).reason is Reason.PATH_NOT_ALLOWED


def test_a_rule_without_paths_allows_every_reading() -> None:
    d = build().decide(req("github.com", "/x%2f..%2f..%2fadmin"))
    assert d.reason is Reason.RULE_MATCH


def test_method_is_judged_after_every_reading() -> None:
    p = build()
    d = p.decide(req("uploads.example.com", "/v1/a%2fb", "POST"))
    assert d.reason is Reason.METHOD_NOT_ALLOWED
    d = p.decide(req("uploads.example.com", "/v1/a%2f..%2f..%2fv2", "GET"))
    assert (d.reason, d.path) == (Reason.PATH_NOT_ALLOWED, "/v2")


def test_crafted_paths_are_refused_quickly() -> None:
    crafted = "/repos/" + "a%2f%5c\\%25..%" * 300
    start = time.perf_counter()
    d = build().decide(req("api.github.com", crafted))
    assert d.reason is Reason.PATH_NOT_ALLOWED
    assert time.perf_counter() - start < 1.0  # milliseconds in fact; generous for load
