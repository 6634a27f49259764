"""Upstream addresses: which ones an allowed name may be connected to (runtime/core/addresses)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from runtime.core.addresses import (
    REFUSED_RANGES,
    choose_address,
    refused_range,
    rule_allows_address,
)
from runtime.core.compile import compile_policy
from runtime.core.config import parse_config
from runtime.core.explain import explain
from runtime.core.policy import Action, Mode, Origin, Policy, Reason, Request, make_rule

CONFIG = "/work/.copilot_here/network.json"
USER = Origin("user", CONFIG)


@pytest.mark.parametrize(
    ("address", "what"),
    [
        # IPv4
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("169.254.0.1", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared address space"),
        ("100.100.100.200", "shared address space"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.0.192", "reserved"),
        # IPv6
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("[fe80::1]", "link-local"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "private"),  # a metadata address over IPv6
        ("fec0::1", "private"),
        ("64:ff9b:1::a00:1", "private"),
        ("ff02::1", "multicast"),
        ("100::1", "reserved"),
        ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
        # IPv6 forms that carry an IPv4 address: judged by it
        ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"),
        ("::ffff:169.254.169.254", "link-local (IPv4-mapped)"),
        ("::ffff:10.1.2.3", "private (IPv4-mapped)"),
        ("64:ff9b::7f00:1", "loopback (NAT64)"),
        ("64:ff9b::a9fe:a9fe", "link-local (NAT64)"),
        ("2002:7f00:1::1", "loopback (6to4)"),
        ("2002:c0a8:101::", "private (6to4)"),
        # not an address at all
        ("localhost", "reserved"),
        ("", "reserved"),
    ],
)
def test_refused_ranges(address: str, what: str) -> None:
    assert refused_range(address) == what


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "140.82.112.3",
        "1.1.1.1",
        "100.63.255.255",  # just below the shared range
        "100.128.0.0",  # just above it
        "172.15.255.255",
        "172.32.0.0",
        "169.253.255.255",
        "2606:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:140.82.112.3",
        "64:ff9b::8c52:7003",
        "2002:8c52:7003::1",
        # The test internet of the end-to-end tests, reachable on purpose.
        "198.18.0.1",
        "198.19.255.254",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "2001:db8::1",
        "2001:db8:1ff::1",
        "::ffff:198.18.0.1",
    ],
)
def test_internet_and_test_ranges_are_not_refused(address: str) -> None:
    assert refused_range(address) is None


def test_test_ranges_are_kept_reachable_on_purpose() -> None:
    """Python calls these non-global; the list leaves them out deliberately (README)."""
    for address in ("198.18.0.1", "192.0.2.1", "2001:db8::1"):
        assert not ipaddress.ip_address(address).is_global
        assert refused_range(address) is None
    # Everything in the list is non-global to Python too (or multicast, or the deprecated
    # site-local range): nothing on the internet is refused.
    for network, _ in REFUSED_RANGES:
        first = network.network_address
        assert not first.is_global or first.is_multicast or first.is_site_local, network


def test_rule_allows_address() -> None:
    plain = make_rule("api.example.com")
    private = make_rule("registry.corp.test", allow_private_addresses=True)
    literal = make_rule("10.0.0.5")
    literal6 = make_rule("[fd00::5]")
    assert rule_allows_address(plain, "140.82.112.3")
    assert not rule_allows_address(plain, "127.0.0.1")
    assert not rule_allows_address(plain, "::ffff:127.0.0.1")
    assert not rule_allows_address(None, "169.254.169.254")
    assert rule_allows_address(None, "198.18.0.1")
    assert rule_allows_address(private, "127.0.0.1")
    assert rule_allows_address(private, "fe80::1%eth0")
    # An IP-literal rule allows its own address, and no other.
    assert rule_allows_address(literal, "10.0.0.5")
    assert not rule_allows_address(literal, "10.0.0.6")
    assert not rule_allows_address(literal, "::ffff:10.0.0.5")
    assert rule_allows_address(literal6, "fd00:0::5")


def decision(mode: Mode, host: str = "app.test", **rule_kw):
    rules = [make_rule("app.test", ["/api/"], origin=USER, **rule_kw)]
    rules.append(make_rule("10.9.9.9", origin=USER))
    policy = Policy.build(mode, True, rules, CONFIG)
    return policy.decide(Request("GET", "/api/x", sni=host, host_header=host))


def test_choose_takes_the_first_allowed_address_in_resolver_order() -> None:
    d = decision(Mode.ENFORCE)
    assert choose_address(d, ["198.18.0.1", "198.18.0.2"]) == ("198.18.0.1", d)
    # A mixed answer: the private addresses are skipped, the public one is used.
    assert choose_address(d, ["127.0.0.1", "10.0.0.1", "198.18.0.3"]) == ("198.18.0.3", d)
    assert choose_address(d, []) == (None, d)


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["169.254.169.254"], ["10.0.0.1", "::1"], ["::ffff:127.0.0.1"]],
)
def test_enforce_refuses_a_name_that_resolves_only_off_the_internet(addresses) -> None:
    d = decision(Mode.ENFORCE)
    assert d.action is Action.ALLOW
    address, refused = choose_address(d, addresses)
    assert address is None
    assert refused.blocked and refused.reason is Reason.PRIVATE_ADDRESS
    assert refused.address == addresses[0] and refused.rule == d.rule
    assert (refused.host, refused.path) == ("app.test", "/api/x")


def test_monitor_connects_and_flags_a_violation() -> None:
    d = decision(Mode.MONITOR)
    address, flagged = choose_address(d, ["127.0.0.1"])
    assert address == "127.0.0.1"
    assert flagged.violation and flagged.reason is Reason.PRIVATE_ADDRESS
    # A violation already (no rule for the host) keeps its own reason.
    other = decision(Mode.MONITOR, host="evil.test")
    assert choose_address(other, ["169.254.169.254"]) == ("169.254.169.254", other)


def test_allow_all_checks_nothing() -> None:
    d = Policy.build(Mode.ALLOW_ALL, False, (), "x").decide(Request("GET", "/", sni="a.test"))
    assert choose_address(d, ["127.0.0.1"]) == ("127.0.0.1", d)


def test_the_rule_field_and_ip_literal_rules_allow() -> None:
    d = decision(Mode.ENFORCE, allow_private_addresses=True)
    assert choose_address(d, ["127.0.0.1"]) == ("127.0.0.1", d)
    literal = decision(Mode.ENFORCE, host="10.9.9.9")
    assert choose_address(literal, ["10.9.9.9"]) == ("10.9.9.9", literal)


def test_a_blocked_decision_gets_no_address() -> None:
    d = decision(Mode.ENFORCE, host="evil.test")
    assert choose_address(d, ["198.18.0.1"]) == (None, d)


def test_explanation_names_the_address_and_the_fix() -> None:
    _, refused = choose_address(decision(Mode.ENFORCE), ["169.254.169.254"])
    text = explain(refused, "GET", "https://app.test/api/x", CONFIG)
    assert text.startswith("BLOCKED: GET https://app.test/api/x\n")
    assert "reason: private_address: " in text
    assert "address: 169.254.169.254 (link-local)\n" in text
    assert "only if app.test really is at 169.254.169.254" in text
    rule = {"host": "app.test", "allowed_paths": ["/api/"], "allow_private_addresses": True}
    assert f'"allowed_rules" in {CONFIG}: {json.dumps(rule)}' in text


def test_config_field_compiles_and_round_trips() -> None:
    text = json.dumps(
        {
            "enabled": True,
            "mode": "enforce",
            "allowed_rules": [
                {"host": "registry.corp.test", "allow_private_addresses": True},
                {"host": "api.example.com"},
            ],
        }
    )
    policy = compile_policy(parse_config(text, CONFIG), CONFIG)
    private, plain = policy.rules
    assert private.allow_private_addresses and not plain.allow_private_addresses
    data = policy.to_json()
    assert data["rules"][0]["allow_private_addresses"] is True
    assert "allow_private_addresses" not in data["rules"][1]  # policy.json stays as it was
    assert Policy.from_json(data).rules == policy.rules
