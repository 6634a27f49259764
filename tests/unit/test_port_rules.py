"""A rule's `ports`: validation, what the compiled policy opens, the port keeper's
choice of entries, and the DNS guard asking it before it answers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading

import pytest

from firewall import ipset
from runtime.container.dnsguard import Guard, PortOpener, Upstream, answer_addresses
from runtime.container.portkeeper import Keeper, entries_for, serve
from runtime.core.compile import built_in_rules, compile_policy
from runtime.core.config import ConfigError, validate_config
from runtime.core.policy import Mode, Policy, Request, make_rule
from tests.harness.dns import DnsServer, build_query


def config(*rules: dict, mode: str = "enforce", inherit: bool = False):
    data = {"enabled": True, "mode": mode, "inherit_defaults": inherit, "log_to_file": True}
    data["allowed_rules"] = list(rules)
    return validate_config(data, "net.json")


def problems(*rules: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(*rules)
    return [f"{p.pointer}: {p.message}. Fix: {p.fix}" for p in info.value.problems]


# --------------------------------------------------------------------------- validation


def test_ports_are_read_deduplicated_and_a_ports_only_rule_grants_no_http() -> None:
    (only, both) = config(
        {"host": "github.com", "ports": [22, 2222, 22]},
        {"host": "git.example.com", "ports": [22], "allowed_paths": []},
    ).allowed_rules
    assert only.ports == (22, 2222) and not only.http
    assert both.ports == (22,) and both.http


@pytest.mark.parametrize(
    ("ports", "says"),
    [
        ([], "must be a non-empty list of TCP ports"),
        (22, "must be a non-empty list of TCP ports, not 22"),
        (["22"], '"22" is not a TCP port (1-65535)'),
        ([0], "0 is not a TCP port"),
        ([65536], "65536 is not a TCP port"),
        ([True], "true is not a TCP port"),
        ([443], "port 443 cannot be opened by a rule: HTTPS always goes through the interceptor"),
        ([80], "port 80 cannot be opened by a rule: HTTP always goes through the interceptor"),
        ([53], "port 53 cannot be opened by a rule: DNS always goes to the DNS guard"),
    ],
)
def test_bad_ports_name_the_field_and_the_fix(ports, says) -> None:
    (found,) = problems({"host": "github.com", "ports": ports})
    assert found.startswith("/allowed_rules/0/ports") and says in found, found
    assert "Fix: " in found


@pytest.mark.parametrize("key", ["port", "tcp_ports", "Ports", "tcp-ports", "allowed_ports"])
def test_misspelt_ports_get_did_you_mean(key) -> None:
    (found,) = problems({"host": "github.com", key: [22]})
    assert found == f'/allowed_rules/0/{key}: unknown key "{key}". Fix: rename it to "ports"'


# --------------------------------------------------------------------------- the policy


def test_ports_for_exact_wildcard_and_most_specific_pattern() -> None:
    policy = compile_policy(
        config(
            {"host": "github.com", "ports": [22]},
            {"host": "*.example.com", "ports": [2222, 7999]},
            {"host": "deep.example.com", "ports": [22]},
            {"host": "web.example.com", "allowed_paths": ["/"]},  # HTTP only
            {"host": "198.18.0.9", "ports": [5432]},
        ),
        "net.json",
    )
    assert policy.ports_for("github.com") == {22}
    assert policy.ports_for("GitHub.com.") == {22}
    assert policy.ports_for("a.example.com") == {2222, 7999}
    assert policy.ports_for("x.a.example.com") == {2222, 7999}
    assert policy.ports_for("deep.example.com") == {22}  # exact beats the wildcard
    # An HTTP rule does not hide the wildcard's ports: each grant has its own lookup.
    assert policy.ports_for("web.example.com") == {2222, 7999}
    assert policy.ports_for("example.com") == frozenset()  # a wildcard never covers its domain
    assert policy.ports_for("api.github.com") == frozenset()
    assert policy.ports_for("198.18.0.9") == {5432}
    assert policy.ports_for("not a host") == frozenset()
    # Monitor mode opens exactly what enforce does (the firewall cannot flag a TCP
    # connection); allow-all opens nothing: there is no firewall rule to open.
    assert Policy.build(Mode.MONITOR, True, policy.rules, "x").ports_for("a.example.com") == {
        2222,
        7999,
    }
    assert Policy.build(Mode.ALLOW_ALL, False, policy.rules, "x").ports_for("github.com") == set()


def test_a_ports_only_rule_allows_no_http_but_does_not_hide_another_http_rule() -> None:
    policy = compile_policy(
        config(
            {"host": "github.com", "ports": [22]},
            {"host": "*.example.com", "allowed_paths": ["/ok"]},
            {"host": "git.example.com", "ports": [22]},
        ),
        "net.json",
    )
    blocked = policy.decide(Request("GET", "/x", sni="github.com"))
    assert blocked.blocked and blocked.reason.value == "host_not_allowed"
    # The exact ports-only rule does not take HTTP away from the wildcard.
    assert not policy.decide(Request("GET", "/ok", sni="git.example.com")).blocked
    # The DNS guard forwards both: each could be allowed something.
    assert policy.rules_naming("github.com") and policy.rules_naming("git.example.com")


def test_policy_json_round_trip_keeps_ports_and_no_http() -> None:
    rules = [make_rule("github.com", ports=[22], http=False, schemes=None)]
    policy = Policy.build(Mode.ENFORCE, True, rules, "x")
    again = Policy.from_json(json.loads(json.dumps(policy.to_json())))
    assert again.rules == policy.rules
    assert again.to_json()["rules"][0]["ports"] == [22]
    assert again.to_json()["rules"][0]["http"] is False


def test_a_users_ports_rule_keeps_the_built_in_http_rules_and_replaces_built_in_ports() -> None:
    built_in = built_in_rules(
        [
            {"host": "github.com", "allowed_paths": ["/*/*/info/refs"], "methods": ["GET"]},
            {"host": "github.com", "ports": [22]},
        ]
    )
    mine = config({"host": "github.com", "ports": [2222]}, inherit=True)
    policy = compile_policy(mine, "net.json", built_in)
    assert policy.ports_for("github.com") == {2222}
    assert not policy.decide(Request("GET", "/o/r/info/refs", sni="github.com")).blocked
    http = config({"host": "github.com", "allowed_paths": ["/x"]}, inherit=True)
    policy = compile_policy(http, "net.json", built_in)
    assert policy.ports_for("github.com") == {22}  # the built-in SSH stays
    assert policy.decide(Request("GET", "/o/r/info/refs", sni="github.com")).blocked
    nothing = config({"host": "github.com", "schemes": []}, inherit=True)
    assert compile_policy(nothing, "net.json", built_in).ports_for("github.com") == set()


def test_the_built_in_defaults_open_ssh_to_github_only() -> None:
    from runtime.resolve import load_built_in

    policy = compile_policy(config(inherit=True), "net.json", load_built_in())
    assert policy.ports_for("github.com") == {22}
    assert policy.ports_for("api.github.com") == frozenset()
    assert not policy.decide(Request("GET", "/o/r/info/refs", sni="github.com")).blocked


# --------------------------------------------------------------------------- the port keeper


def ports_policy(*rules: dict) -> Policy:
    return compile_policy(config(*rules), "net.json")


def test_keeper_takes_the_ports_from_the_policy_and_clamps_the_ttl() -> None:
    policy = ports_policy({"host": "*.example.com", "ports": [22, 2222]})
    entries, refused = entries_for(policy, "git.example.com", ["198.18.0.5", "2001:db8::5"], 0)
    assert [e.line() for e in entries] == [
        "add sp_ports4 198.18.0.5,tcp:22 timeout 30",
        "add sp_ports4 198.18.0.5,tcp:2222 timeout 30",
        "add sp_ports6 2001:db8::5,tcp:22 timeout 30",
        "add sp_ports6 2001:db8::5,tcp:2222 timeout 30",
    ]
    assert refused == []
    long, _ = entries_for(policy, "git.example.com", ["198.18.0.5"], 10**9)
    assert {e.timeout for e in long} == {ipset.MAX_TIMEOUT}


def test_an_answer_never_puts_a_timeout_on_an_ip_literal_rules_entry() -> None:
    """`ipset add -exist` refreshes an entry's timeout: a name answering the address of
    an IP-literal rule would turn that rule's entry for the run into one that expires."""
    policy = ports_policy(
        {"host": "198.18.0.5", "ports": [22]},
        {"host": "[2001:db8:0::5]", "ports": [22]},
        {"host": "git.example.com", "ports": [22, 2222]},
    )
    entries, refused = entries_for(policy, "git.example.com", ["198.18.0.5", "2001:db8::5"], 60)
    assert [e.line() for e in entries] == [
        "add sp_ports4 198.18.0.5,tcp:2222 timeout 60",
        "add sp_ports6 2001:db8::5,tcp:2222 timeout 60",
    ]
    assert refused == []
    assert {(e.address, e.port, e.timeout) for e in ipset.literal_entries(policy)} == {
        ("198.18.0.5", 22, 0),
        ("2001:db8::5", 22, 0),
    }


def test_keeper_opens_nothing_for_names_without_ports_or_bad_addresses() -> None:
    policy = ports_policy({"host": "github.com", "ports": [22]}, {"host": "example.com"})
    assert entries_for(policy, "example.com", ["198.18.0.5"], 60)[0] == []
    assert entries_for(policy, "evil.test", ["198.18.0.5"], 60)[0] == []
    entries, refused = entries_for(
        policy, "github.com", ["not-an-ip", "127.0.0.1", "169.254.169.254", "::ffff:10.0.0.1"], 60
    )
    assert entries == [] and len(refused) == 4, refused
    private = ports_policy({"host": "github.com", "ports": [22], "allow_private_addresses": True})
    assert [e.address for e in entries_for(private, "github.com", ["10.0.0.1"], 60)[0]] == [
        "10.0.0.1"
    ]


def test_ip_literal_rules_open_their_address_for_the_run() -> None:
    policy = ports_policy(
        {"host": "198.18.0.9", "ports": [5432]}, {"host": "[2001:db8::9]", "ports": [22]}
    )
    assert [e.line() for e in ipset.literal_entries(policy)] == [
        "add sp_ports4 198.18.0.9,tcp:5432 timeout 0",
        "add sp_ports6 2001:db8::9,tcp:22 timeout 0",
    ]


def test_keeper_reports_a_failed_ipset_and_a_bad_message() -> None:
    def broken(entries) -> None:
        raise ipset.IpsetError("ipset restore failed: boom")

    keeper = Keeper(ports_policy({"host": "github.com", "ports": [22]}), broken)
    message = {"name": "github.com", "addresses": ["198.18.0.5"], "ttl": 60}
    assert keeper.handle(json.dumps(message).encode()) == {"error": "ipset restore failed: boom"}
    assert "error" in keeper.handle(b"not json")
    assert "error" in keeper.handle(b'{"name": "github.com"}')


# --------------------------------------------------------------------------- the guard asks first


@pytest.fixture
def upstream():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records = {"git.example.com": ["198.18.0.5", "2001:db8::5"], "other.test": ["198.18.0.6"]}
    with DnsServer(["127.0.0.1"], records, port=port) as server:
        yield server, Upstream(["127.0.0.1"], timeout=1.0, port=port)


def test_answer_addresses_reads_a_and_aaaa_with_the_smallest_ttl() -> None:
    from dnslib import QTYPE, RR, A, DNSRecord

    reply = DNSRecord.question("x.test").reply()
    reply.add_answer(RR("x.test", QTYPE.A, rdata=A("198.18.0.1"), ttl=300))
    reply.add_answer(RR("x.test", QTYPE.A, rdata=A("198.18.0.2"), ttl=20))
    assert answer_addresses(reply.pack(), "x.test") == (["198.18.0.1", "198.18.0.2"], 20)
    assert answer_addresses(b"junk", "x.test") == ([], 0)


def test_answer_addresses_are_only_the_question_names_and_its_cname_chains() -> None:
    """A hostile upstream's records for other names, or in the additional section, open
    nothing: a client takes only the name's chain from an answer."""
    from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord

    reply = DNSRecord.question("git.example.com").reply()
    reply.add_answer(RR("elsewhere.test", QTYPE.A, rdata=A("198.18.0.66"), ttl=5))
    reply.add_answer(RR("Edge.CDN.test", QTYPE.A, rdata=A("198.18.0.1"), ttl=300))
    reply.add_answer(RR("cdn.test", QTYPE.CNAME, rdata=CNAME("edge.cdn.test"), ttl=300))
    reply.add_answer(RR("GIT.example.com", QTYPE.CNAME, rdata=CNAME("cdn.test"), ttl=300))
    reply.add_answer(RR("unrelated.test", QTYPE.CNAME, rdata=CNAME("other.test"), ttl=300))
    reply.add_answer(RR("other.test", QTYPE.AAAA, rdata=AAAA("2001:db8::66"), ttl=5))
    reply.add_ar(RR("git.example.com", QTYPE.A, rdata=A("198.18.0.67"), ttl=5))
    assert answer_addresses(reply.pack(), "git.example.com.") == (["198.18.0.1"], 300)
    # An answer to another question than the one asked (TCP answers are not compared).
    assert answer_addresses(reply.pack(), "other.test") == (["2001:db8::66"], 5)
    assert answer_addresses(reply.pack(), "elsewhere.test") == (["198.18.0.66"], 5)
    assert answer_addresses(reply.pack(), "nothing.test") == ([], 0)


def test_the_keeper_is_asked_through_its_socket_before_the_answer_goes_out(
    upstream, tmp_path
) -> None:
    """The real client and server over a real socket; the ipset call is recorded."""
    _, up = upstream
    policy = ports_policy({"host": "*.example.com", "ports": [22]}, {"host": "other.test"})
    added: list[str] = []
    keeper = Keeper(policy, lambda entries: added.extend(e.line() for e in entries))
    path = tmp_path / "keeper.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    sock.listen(4)
    stop = threading.Event()
    uids = {0, os.getuid()}
    server = threading.Thread(target=serve, args=(keeper, sock, uids, stop.is_set), daemon=True)
    server.start()
    order: list[str] = []
    opener = PortOpener(str(path))

    def recording_opener(name, addresses, ttl):
        result = opener(name, addresses, ttl)
        order.append("opened")
        return result

    lines: list = []
    guard = Guard(policy, up, lambda line: lines.append(line) or True, recording_opener)

    async def ask(name: str) -> bytes | None:
        answer = await guard.handle(build_query(name), False)
        order.append("answered")
        return answer

    assert asyncio.run(ask("git.example.com"))
    assert order == ["opened", "answered"]
    assert added == ["add sp_ports4 198.18.0.5,tcp:22 timeout 60"]
    assert lines[-1].opened == ["198.18.0.5:22"]
    # A name without ports: the keeper is not asked.
    assert asyncio.run(ask("other.test"))
    assert order == ["opened", "answered", "answered"] and lines[-1].opened is None
    stop.set()
    server.join(5)
    sock.close()


def test_a_dead_keeper_still_gets_the_answer_out_and_opens_nothing(upstream, tmp_path) -> None:
    _, up = upstream
    policy = ports_policy({"host": "*.example.com", "ports": [22]})
    lines: list = []
    guard = Guard(
        policy, up, lambda line: lines.append(line) or True, PortOpener(str(tmp_path / "none"))
    )
    assert asyncio.run(guard.handle(build_query("git.example.com"), False))
    assert lines[-1].opened is None and lines[-1].rcode == "NOERROR"
