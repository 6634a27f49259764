"""The pure rule builder: no iptables needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firewall.iptables import CAPS_FIX, FirewallError, _norm_addr, check_capabilities
from firewall.ruleset import (
    FILTER_CHAIN,
    INBOUND_CHAIN,
    NAT_CHAIN,
    OUR_CHAINS,
    LockLevel,
    build_ruleset,
    lock_level,
    parse_resolv_conf,
    split_nameservers,
)
from runtime.core.policy import Mode, Policy, make_rule


def rules(rs, family, table):
    fam = rs.family(family)
    spec = next(t for t in fam.tables if t.table == table)
    return [r.render() for r in spec.rules]


def test_ipv4_filter_order_matches_the_issue():
    rs = build_ruleset(999, 58080, ["198.18.0.1", "127.0.0.11"])
    assert rules(rs, 4, "filter") == [
        "-o lo -j ACCEPT",
        "-d 127.0.0.1/32 -p tcp -m tcp --dport 58080 -j ACCEPT",
        "-m conntrack --ctstate RELATED,ESTABLISHED --ctdir ORIGINAL -j ACCEPT",
        "-p tcp -m tcp --dport 80 -m owner --uid-owner 999 -j ACCEPT",
        "-p tcp -m tcp --dport 443 -m owner --uid-owner 999 -j ACCEPT",
        "-d 198.18.0.1/32 -p udp -m udp --dport 53 -j ACCEPT",
        "-d 198.18.0.1/32 -p tcp -m tcp --dport 53 -j ACCEPT",
        "-p tcp -m set --match-set sp_ports4 dst,dst -j ACCEPT",
        "-p udp -m udp --dport 443 -j REJECT --reject-with icmp-port-unreachable",
        "-p tcp -j REJECT --reject-with tcp-reset",
        "-j REJECT --reject-with icmp-admin-prohibited",
    ]


def test_nat_redirects_everyone_but_proxy_user_both_families():
    rs = build_ruleset(999, 12345, [])
    for fam in (4, 6):
        assert rules(rs, fam, "nat") == [
            "-o lo -j RETURN",
            "-p tcp -m tcp --dport 80 -m owner ! --uid-owner 999 -j REDIRECT --to-ports 12345",
            "-p tcp -m tcp --dport 443 -m owner ! --uid-owner 999 -j REDIRECT --to-ports 12345",
        ]


def test_ipv6_is_locked_the_same_way_and_ends_in_reject():
    rs = build_ruleset(999, 58080, ["2001:db8::53", "198.18.0.1"])
    v6 = rules(rs, 6, "filter")
    assert v6[0] == "-o lo -j ACCEPT"
    assert v6[1] == "-d ::1/128 -p tcp -m tcp --dport 58080 -j ACCEPT"
    assert "-d 2001:db8::53/128 -p udp -m udp --dport 53 -j ACCEPT" in v6
    assert not any("198.18.0.1" in r for r in v6)
    assert v6[-1] == "-j REJECT --reject-with icmp6-adm-prohibited"
    assert "-p udp -m udp --dport 443 -j REJECT --reject-with icmp6-port-unreachable" in v6
    # Only neighbour discovery is let through among ICMPv6 (plus related errors).
    icmp = [r for r in v6 if "ipv6-icmp" in r]
    assert {r.split("--icmpv6-type ")[1].split()[0] for r in icmp} == {"133", "135", "136"}


@pytest.mark.parametrize("fam", [4, 6])
def test_every_accept_is_bounded(fam):
    """Nothing accepts by port alone: each ACCEPT is loopback, established, NDP,
    proxy-uid owned, a DNS nameserver address, or an address,port of the ports set."""
    rs = build_ruleset(4242, 58080, ["198.18.0.1", "2001:db8::1"])
    for r in rules(rs, fam, "filter"):
        if not r.endswith("-j ACCEPT"):
            continue
        assert (
            r.startswith("-o lo ")
            or r.startswith(("-d 127.0.0.1/32 -p tcp -m tcp --dport 58080 ", "-d ::1/128 -p tcp"))
            or "--ctstate RELATED,ESTABLISHED" in r
            or "--icmpv6-type" in r
            or "-m owner --uid-owner 4242" in r
            or (r.startswith("-d ") and "--dport 53" in r)
            or r == f"-p tcp -m set --match-set sp_ports{fam} dst,dst -j ACCEPT"
        ), r


def test_outputs_jump_and_policies():
    rs = build_ruleset(1, 58080, [])
    for fam in rs.families:
        f, i, n = fam.tables
        assert (f.table, f.chain, f.hook, f.hook_policy) == (
            "filter",
            FILTER_CHAIN,
            "OUTPUT",
            "DROP",
        )
        assert (i.table, i.chain, i.hook, i.hook_policy) == (
            "filter",
            INBOUND_CHAIN,
            "INPUT",
            "DROP",
        )
        assert (n.table, n.chain, n.hook, n.hook_policy) == ("nat", NAT_CHAIN, "OUTPUT", None)
        assert f.jump.render() == f"-j {FILTER_CHAIN}"
    text = rs.family(4).save_text()
    assert text.startswith("*filter\n:OUTPUT DROP\n:SECURE_PROXY_OUT -\n-A OUTPUT -j SECURE")
    assert ":INPUT DROP\n:SECURE_PROXY_IN -\n-A INPUT -j SECURE_PROXY_IN" in text
    assert text.count("COMMIT") == 2 and text.count("*filter") == 1


@pytest.mark.parametrize("fam", [4, 6])
def test_inbound_accepts_only_replies_loopback_and_ndp(fam):
    inbound = build_ruleset(1, 58080, []).family(fam).tables[1]
    rendered = [r.render() for r in inbound.rules]
    icmp = "ipv6-icmp" if fam == 6 else "icmp"
    assert rendered[:3] == [
        "-i lo -j ACCEPT",
        "-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT",
        f"-p {icmp} -m conntrack --ctstate RELATED -j ACCEPT",
    ]
    assert rendered[-1] == "-j DROP"
    ndp = [r for r in rendered[3:-1]]
    assert ndp == (
        [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in (134, 135, 136)]
        if fam == 6
        else []
    )


def test_deterministic():
    a = build_ruleset(7, 58080, ["198.18.0.1", "198.18.0.1", "2001:db8::1"])
    b = build_ruleset(7, 58080, ["198.18.0.1", "2001:db8::1"])
    assert a.families == b.families


@pytest.mark.parametrize(
    ("uid", "port"), [(0, 58080), (-1, 58080), (True, 58080), (5, 0), (5, 70000)]
)
def test_rejects_bad_input(uid, port):
    with pytest.raises(ValueError):
        build_ruleset(uid, port, [])


def test_nameserver_split():
    v4, v6 = split_nameservers(
        ["127.0.0.11", "198.18.0.1", "::1", "fe80::1%eth0", "::ffff:198.18.0.9", "2001:db8::1"]
    )
    assert v4 == ["198.18.0.1", "198.18.0.9"]
    assert v6 == ["fe80::1", "2001:db8::1"]


def test_parse_resolv_conf():
    text = """# generated
nameserver 127.0.0.11
options ndots:0
nameserver 198.18.0.1 # comment
nameserver not-an-ip
search example.com
nameserver 2001:db8::53
"""
    assert parse_resolv_conf(text) == ["127.0.0.11", "198.18.0.1", "2001:db8::53"]


def test_docker_embedded_dns_needs_no_rule():
    rs = build_ruleset(999, 58080, parse_resolv_conf("nameserver 127.0.0.11\n"))
    assert not any("--dport 53" in r for r in rules(rs, 4, "filter"))


@given(
    uid=st.integers(min_value=1, max_value=2**31),
    port=st.integers(min_value=1, max_value=65535),
    servers=st.lists(st.ip_addresses(), max_size=5),
)
def test_property_shape(uid, port, servers):
    rs = build_ruleset(uid, port, [str(s) for s in servers])
    for fam in (4, 6):
        f = rules(rs, fam, "filter")
        assert f[0] == "-o lo -j ACCEPT"
        assert f[-1].startswith("-j REJECT")
        assert sum(f"--uid-owner {uid} -j ACCEPT" in r for r in f) == 2
        nat = rules(rs, fam, "nat")
        assert all(f"--to-ports {port}" in r for r in nat[1:])


def test_norm_addr_readback_forms():
    assert _norm_addr("0.0.0.0/0.0.0.0") is None
    assert _norm_addr("::/0") is None
    assert _norm_addr("198.18.0.1/255.255.255.255") == "198.18.0.1/32"
    assert _norm_addr("198.18.0.0/255.255.255.0") == "198.18.0.0/24"
    assert _norm_addr("2001:db8::1/128") == "2001:db8::1/128"


def _status(caps: int) -> str:
    return f"Name:\tx\nCapEff:\t{caps:016x}\n"


def test_capability_check():
    check_capabilities(_status((1 << 12) | (1 << 13)))
    for caps in (0, 1 << 12, 1 << 13):
        with pytest.raises(FirewallError) as e:
            check_capabilities(_status(caps))
        assert str(e.value).startswith(CAPS_FIX)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- lock levels


def _policy(mode: Mode, log: bool) -> Policy:
    rules = [make_rule("example.com", (), None)] if mode is not Mode.ALLOW_ALL else []
    return Policy.build(mode, log, rules, "test")


@pytest.mark.parametrize(
    ("mode", "log", "level"),
    [
        (Mode.ALLOW_ALL, False, LockLevel.NONE),
        (Mode.ALLOW_ALL, True, LockLevel.INTERCEPT),
        (Mode.ENFORCE, False, LockLevel.FULL),
        (Mode.ENFORCE, True, LockLevel.FULL),
        (Mode.MONITOR, True, LockLevel.FULL),
    ],
)
def test_the_level_follows_the_compiled_policy(mode, log, level):
    assert lock_level(_policy(mode, log)) is level


@pytest.mark.parametrize("fam", [4, 6])
def test_intercept_level_is_the_web_redirect_alone(fam):
    rs = build_ruleset(999, 58080, ["198.18.0.1"], dns_port=58053, level=LockLevel.INTERCEPT)
    spec = rs.family(fam)
    assert [(t.table, t.chain, t.hook_policy) for t in spec.tables] == [("nat", NAT_CHAIN, None)]
    assert [r.render() for r in spec.tables[0].rules] == [
        "-o lo -j RETURN",
        "-p tcp -m tcp --dport 80 -m owner ! --uid-owner 999 -j REDIRECT --to-ports 58080",
        "-p tcp -m tcp --dport 443 -m owner ! --uid-owner 999 -j REDIRECT --to-ports 58080",
    ]
    # No lock, no DNS guard: the filter chains must not be there.
    assert [(c.table, c.chain) for c in spec.absent] == [
        ("filter", FILTER_CHAIN),
        ("filter", INBOUND_CHAIN),
    ]
    assert rs.dns_port is None


def test_none_level_has_no_rule_and_every_chain_of_ours_absent():
    rs = build_ruleset(999, 58080, ["198.18.0.1"], level=LockLevel.NONE)
    for fam in (4, 6):
        assert rs.family(fam).tables == ()
        assert rs.family(fam).absent == OUR_CHAINS


def test_full_level_leaves_nothing_absent_and_redirects_dns_first():
    rs = build_ruleset(999, 58080, ["198.18.0.1"], dns_port=58053)
    assert rs.level is LockLevel.FULL and rs.family(4).absent == ()
    nat = rules(rs, 4, "nat")
    assert nat[:2] == [
        "-p udp -m udp --dport 53 -m owner ! --uid-owner 999 -j REDIRECT --to-ports 58053",
        "-p tcp -m tcp --dport 53 -m owner ! --uid-owner 999 -j REDIRECT --to-ports 58053",
    ]


def test_with_the_dns_guard_unredirected_user_dns_is_refused_before_any_accept():
    """A user's query that matched a conntrack entry of the guard's is not redirected;
    it must be refused before the loopback and ESTABLISHED accepts can let it out."""
    for fam, unreach in ((4, "icmp-port-unreachable"), (6, "icmp6-port-unreachable")):
        with_guard = rules(build_ruleset(999, 58080, ["198.18.0.1"], dns_port=58053), fam, "filter")
        assert with_guard[0] == (
            f"-p udp -m udp --dport 53 -m owner ! --uid-owner 999 -j REJECT --reject-with {unreach}"
        )
        # ... and a user's datagram from port 53 (it would take the guard's upstream flows).
        assert with_guard[1] == (
            f"-p udp -m udp --sport 53 -m owner ! --uid-owner 999 -j REJECT --reject-with {unreach}"
        )
        without = rules(build_ruleset(999, 58080, ["198.18.0.1"]), fam, "filter")
        assert without[0] == "-o lo -j ACCEPT"


@pytest.mark.parametrize("fam", [4, 6])
def test_the_ports_set_is_matched_before_the_final_rejects_at_full_level_only(fam):
    """A rule's `ports`: TCP to an address,port of the family's set, right before the
    REJECTs; the intercept level (rules disabled) has no such rule and no set."""
    full = rules(build_ruleset(999, 58080, [], 58053), fam, "filter")
    rule = f"-p tcp -m set --match-set sp_ports{fam} dst,dst -j ACCEPT"
    assert full.count(rule) == 1
    assert full.index(rule) == len(full) - 4  # then QUIC, TCP and the rest refused
    intercept = build_ruleset(999, 58080, [], level=LockLevel.INTERCEPT)
    assert not [
        r for f in intercept.families for t in f.tables for r in t.rules if "set" in r.render()
    ]


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("level", [LockLevel.FULL, LockLevel.INTERCEPT])
def test_workers_spread_new_connections_in_turn(fam, level):
    rs = build_ruleset(999, 58080, ["198.18.0.1"], 58053, level, workers=3)
    assert rs.workers == 3
    nat = [r.render() for r in rs.family(fam).tables[-1].rules]
    own = "-m owner ! --uid-owner 999"
    for port in (80, 443):
        head = f"-p tcp -m tcp --dport {port} {own}"
        at = nat.index(
            f"{head} -m statistic --mode nth --every 3 --packet 0 -j REDIRECT --to-ports 58080"
        )
        assert nat[at + 1 : at + 3] == [
            f"{head} -m statistic --mode nth --every 2 --packet 0 -j REDIRECT --to-ports 58081",
            f"{head} -j REDIRECT --to-ports 58082",  # the last one takes the rest
        ]
    if level is LockLevel.FULL:
        loopback = "::1/128" if fam == 6 else "127.0.0.1/32"
        filt = [r.render() for r in rs.family(fam).tables[0].rules]
        assert f"-d {loopback} -p tcp -m tcp --dport 58080:58082 -j ACCEPT" in filt
        assert not any("--dport 58080 " in r for r in filt)


def test_one_worker_is_the_rule_set_of_before():
    one = build_ruleset(999, 58080, ["198.18.0.1"], 58053, workers=1)
    assert one == build_ruleset(999, 58080, ["198.18.0.1"], 58053)
    assert not any("statistic" in line for line in one.family(4).save_text().splitlines())


@pytest.mark.parametrize(
    ("port", "workers", "dns", "why"),
    [
        (58080, 0, None, "positive"),
        (58080, True, None, "positive"),
        (65535, 2, None, "past port 65535"),
        (58080, 4, 58083, "DNS guard port"),
    ],
)
def test_bad_workers_are_refused(port, workers, dns, why):
    with pytest.raises(ValueError, match=why):
        build_ruleset(999, port, [], dns, workers=workers)
