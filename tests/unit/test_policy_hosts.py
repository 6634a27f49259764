"""Host normalisation and host matching in the pure core."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.core.hosts import HostError, normalize_host, normalize_host_pattern, split_host_port
from runtime.core.policy import Mode, Policy, Reason, Request, make_rule


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("GitHub.COM", "github.com"),
        ("github.com.", "github.com"),
        ("  api.github.com ", "api.github.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("198.18.0.1", "198.18.0.1"),
        ("My_Bucket.s3.example.com", "my_bucket.s3.example.com"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("2001:0db8:0000::0001", "2001:db8::1"),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", ".", "a..b", ".example.com", "exa mple.com", "a.com..", "ex!ample.com", "a" * 64 + ".com"],
)
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(HostError):
        normalize_host(raw)


def test_pattern_forms() -> None:
    assert normalize_host_pattern("*.Example.COM.") == "*.example.com"
    with pytest.raises(HostError):
        normalize_host_pattern("api.*.com")
    with pytest.raises(HostError):
        normalize_host_pattern("*example.com")
    with pytest.raises(HostError):
        normalize_host_pattern("*.198.18.0.1")


@pytest.mark.parametrize(
    ("value", "host"),
    [("example.com:443", "example.com"), ("[::1]:80", "[::1]"), ("::1", "::1"), ("a.b", "a.b")],
)
def test_split_host_port(value: str, host: str) -> None:
    assert split_host_port(value) == host


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
hostnames = st.lists(labels, min_size=1, max_size=5).map(".".join)


@given(hostnames, st.booleans(), st.booleans())
def test_normalize_host_idempotent(host: str, upper: bool, dot: bool) -> None:
    raw = (host.upper() if upper else host) + ("." if dot else "")
    once = normalize_host(raw)
    assert normalize_host(once) == once
    assert once == host


def policy(*rules, mode: Mode = Mode.ENFORCE) -> Policy:
    return Policy.build(mode, False, rules, "test.json")


def host_decision(p: Policy, host: str) -> Reason:
    return p.decide(Request("GET", "/", sni=host, host_header=host)).reason


def test_plain_host_matches_itself_only() -> None:
    p = policy(make_rule("example.com"))
    assert host_decision(p, "example.com") is Reason.RULE_MATCH
    assert host_decision(p, "EXAMPLE.com.") is Reason.RULE_MATCH
    for other in ("www.example.com", "evilexample.com", "example.com.evil.test", "example.co"):
        assert host_decision(p, other) is Reason.HOST_NOT_ALLOWED, other


def test_wildcard_matches_subdomains_at_dot_boundary() -> None:
    p = policy(make_rule("*.example.com"))
    assert host_decision(p, "a.example.com") is Reason.RULE_MATCH
    assert host_decision(p, "a.b.example.com") is Reason.RULE_MATCH
    assert host_decision(p, "example.com") is Reason.HOST_NOT_ALLOWED
    assert host_decision(p, "evilexample.com") is Reason.HOST_NOT_ALLOWED
    assert host_decision(p, "example.com.evil.test") is Reason.HOST_NOT_ALLOWED


def test_idn_rule_matches_punycode_request_and_back() -> None:
    p = policy(make_rule("bücher.example"))
    assert host_decision(p, "xn--bcher-kva.example") is Reason.RULE_MATCH
    p = policy(make_rule("xn--bcher-kva.example"))
    assert host_decision(p, "bücher.example") is Reason.RULE_MATCH


def test_ip_literal_rules() -> None:
    p = policy(make_rule("198.18.0.7"), make_rule("2001:db8::7"))
    assert p.decide(Request("GET", "/", dialled="198.18.0.7")).reason is Reason.RULE_MATCH
    assert (
        p.decide(Request("GET", "/", host_header="[2001:db8::7]:443")).reason is Reason.RULE_MATCH
    )
    assert p.decide(Request("GET", "/", dialled="198.18.0.8")).reason is Reason.HOST_NOT_ALLOWED


@given(hostnames)
def test_wildcard_never_covers_a_sibling_suffix(label: str) -> None:
    p = policy(make_rule("*.example.com"))
    assert host_decision(p, label + "example.com") is Reason.HOST_NOT_ALLOWED
    assert host_decision(p, label + ".example.com") is Reason.RULE_MATCH


def test_exact_rule_beats_wildcard() -> None:
    p = policy(
        make_rule("*.github.com"),
        make_rule("api.github.com", ["/repos/"]),
    )
    d = p.decide(Request("GET", "/admin", sni="api.github.com"))
    assert d.reason is Reason.PATH_NOT_ALLOWED
    assert d.rule is not None and d.rule.host == "api.github.com"
    assert p.decide(Request("GET", "/admin", sni="x.github.com")).reason is Reason.RULE_MATCH


def test_lookup_is_flat_with_many_rules() -> None:
    rules = [make_rule(f"host{i}.example.com") for i in range(1000)]
    rules += [make_rule(f"*.zone{i}.test") for i in range(1000)]
    p = policy(*rules)
    assert len(p.exact) == 1000 and len(p.wildcard) == 1000
    assert host_decision(p, "host999.example.com") is Reason.RULE_MATCH
    assert host_decision(p, "a.b.zone7.test") is Reason.RULE_MATCH
    assert host_decision(p, "zone7.test") is Reason.HOST_NOT_ALLOWED
