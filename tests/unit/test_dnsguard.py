"""The DNS guard: which names leave, what the client gets, what is recorded.

judge_name and parse_query are pure; the Guard is driven against a real DNS
server on loopback (tests.harness.dns) that records every query it receives.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from runtime.container import dnsguard
from runtime.container.dnsguard import UPSTREAM_PORTS, Guard, Upstream, judge_name, parse_query
from runtime.core.policy import Action, Mode, Policy, Reason, make_rule
from runtime.core.record import DnsRecord
from tests.harness.dns import DnsServer, build_query


class Lines(list):
    """A recorder that keeps the lines; with `failing` set it writes none (a full disk)."""

    failing = False

    def __call__(self, line: DnsRecord) -> bool:
        if self.failing:
            return False
        self.append(line)
        return True


def policy(mode: Mode, *hosts: str, log: bool = True) -> Policy:
    return Policy.build(mode, log, [make_rule(h, (), None) for h in hosts], "test")


ENFORCE = policy(Mode.ENFORCE, "api.github.com", "*.example.com")


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("api.github.com.", True),
        ("API.GitHub.com", True),
        ("a.b.example.com.", True),
        ("example.com.", False),  # a wildcard never covers its own domain
        ("github.com.", False),
        ("c2VjcmV0.evil.test.", False),
        ("api.github.com.evil.test.", False),
        ("bad_label-.x..", False),  # not a host at all
        ("1.0.18.198.in-addr.arpa.", False),
    ],
)
def test_judge_name_enforce(name: str, allowed: bool) -> None:
    decision = judge_name(ENFORCE, name)
    assert (decision.action is Action.ALLOW) is allowed, decision
    if not allowed:
        assert decision.reason is Reason.HOST_NOT_ALLOWED and decision.blocked


def test_judge_name_monitor_flags_and_allow_all_allows() -> None:
    monitor = judge_name(policy(Mode.MONITOR, "api.github.com"), "evil.test.")
    assert monitor.action is Action.VIOLATION and not monitor.blocked and monitor.violation
    allow_all = judge_name(policy(Mode.ALLOW_ALL), "evil.test.")
    assert allow_all.action is Action.ALLOW and allow_all.reason is Reason.ALLOW_ALL


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 5,
        b"GET / HTTP/1.1\r\n\r\n",
        # a response (QR set), not a query
        DNSRecord.question("api.github.com").reply().pack(),
        # two questions
        DNSRecord.question("a.test").pack()[:4]
        + b"\x00\x02"
        + DNSRecord.question("a.test").pack()[6:],
    ],
)
def test_parse_query_drops_what_is_not_one_query(data: bytes) -> None:
    assert parse_query(data) is None


def test_parse_query_reads_name_and_type() -> None:
    query = parse_query(DNSRecord.question("api.github.com", "AAAA").pack())
    assert query is not None and (query.name, query.qtype) == ("api.github.com.", "AAAA")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def upstream():
    port = _free_port()
    records = {"api.github.com": ["198.18.0.7"], "evil.test": ["198.18.0.66"]}
    with DnsServer(["127.0.0.1"], records, port=port) as server:
        yield server, Upstream(["127.0.0.1"], timeout=1.0, port=port)


def _ask(guard: Guard, name: str, tcp: bool = False) -> bytes | None:
    return asyncio.run(guard.handle(build_query(name), tcp))


@pytest.mark.parametrize("tcp", [False, True])
def test_enforce_forwards_allowed_and_answers_nxdomain_for_the_rest(upstream, tcp) -> None:
    server, up = upstream
    records = Lines()
    guard = Guard(ENFORCE, up, records)
    allowed = DNSRecord.parse(_ask(guard, "api.github.com", tcp))
    assert [str(rr.rdata) for rr in allowed.rr] == ["198.18.0.7"]
    denied = DNSRecord.parse(_ask(guard, "c2VjcmV0.evil.test", tcp))
    assert denied.header.rcode == RCODE.NXDOMAIN and not denied.rr
    # The upstream saw the allowed name only: the secret never left.
    assert [q["name"] for q in server.queries] == ["api.github.com"]
    assert [(r.host, r.action, r.reason, r.answers) for r in records] == [
        ("api.github.com", "ALLOW", "rule_match", 1),
        ("c2vjcmv0.evil.test", "BLOCK", "host_not_allowed", 0),
    ]
    assert {r.kind for r in records} == {"dns"}
    assert records[1].rcode == "NXDOMAIN" and records[0].qtype == "A"


def test_monitor_forwards_and_flags(upstream) -> None:
    server, up = upstream
    records = Lines()
    guard = Guard(policy(Mode.MONITOR, "api.github.com"), up, records)
    answer = DNSRecord.parse(_ask(guard, "evil.test"))
    assert [str(rr.rdata) for rr in answer.rr] == ["198.18.0.66"]
    assert [q["name"] for q in server.queries] == ["evil.test"]
    assert records[0].violation is True and records[0].action == "ALLOW"


def test_nothing_recorded_when_the_policy_does_not_log(upstream) -> None:
    _, up = upstream
    records = Lines()
    records.failing = True  # never asked: this policy does not log
    guard = Guard(policy(Mode.ENFORCE, "api.github.com", log=False), up, records)
    assert DNSRecord.parse(_ask(guard, "api.github.com")).header.rcode == RCODE.NOERROR
    _ask(guard, "evil.test")
    assert records == []


def test_garbage_gets_no_answer_and_reaches_nobody(upstream) -> None:
    server, up = upstream
    guard = Guard(ENFORCE, up, Lines())
    assert asyncio.run(guard.handle(b"\x12\x34" + b"x" * 40, False)) is None
    assert server.queries == []


def test_dead_upstream_gives_servfail() -> None:
    guard = Guard(ENFORCE, Upstream(["127.0.0.1"], timeout=0.3, port=_free_port()), Lines())
    answer = DNSRecord.parse(_ask(guard, "api.github.com"))
    assert answer.header.rcode == RCODE.SERVFAIL
    assert QTYPE.get(answer.q.qtype) == "A"


def _rcode(answer: bytes | None) -> str:
    assert answer is not None
    return RCODE.get(DNSRecord.parse(answer).header.rcode)


@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.MONITOR])
def test_unwritable_log_refuses_with_servfail_and_logs_it_once_it_works(upstream, mode) -> None:
    """The policy logs every query: none is answered unlogged (as the interceptor's 503)."""
    server, up = upstream
    records = Lines()
    guard = Guard(policy(mode, "api.github.com"), up, records)
    records.failing = True
    # Forwarded before its line failed: the answer is withheld.
    assert _rcode(_ask(guard, "api.github.com")) == "SERVFAIL"
    assert [q["name"] for q in server.queries] == ["api.github.com"]
    # While the log cannot be written no name is forwarded at all, in monitor mode too.
    assert _rcode(_ask(guard, "api.github.com", tcp=True)) == "SERVFAIL"
    assert _rcode(_ask(guard, "evil.test")) == ("NXDOMAIN" if mode is Mode.ENFORCE else "SERVFAIL")
    assert [q["name"] for q in server.queries] == ["api.github.com"]
    assert records == [] and len(guard.owed) == 3
    # Writable again: the refusals are logged first, then the query is answered.
    records.failing = False
    allowed = DNSRecord.parse(_ask(guard, "api.github.com"))
    assert [str(rr.rdata) for rr in allowed.rr] == ["198.18.0.7"]
    assert [q["name"] for q in server.queries] == ["api.github.com"] * 2
    refused = ("BLOCK", "log_unavailable", "SERVFAIL", False, None)
    blocked = ("BLOCK", "host_not_allowed", "NXDOMAIN", False, None)
    assert [(r.action, r.reason, r.rcode, r.violation, r.rule) for r in records] == [
        refused,
        refused,
        blocked if mode is Mode.ENFORCE else refused,
        ("ALLOW", "rule_match", "NOERROR", False, "api.github.com"),
    ]
    assert [r.transport for r in records] == ["udp", "tcp", "udp", "udp"]
    assert not guard.owed


def test_owed_lines_are_bounded(upstream, monkeypatch) -> None:
    _, up = upstream
    monkeypatch.setattr(dnsguard, "MAX_OWED_LINES", 2)
    records = Lines()
    records.failing = True
    guard = Guard(ENFORCE, up, records)
    for name in ("a.evil.test", "b.evil.test", "c.evil.test"):
        assert _rcode(_ask(guard, name)) == "NXDOMAIN"
    assert [r.host for r in guard.owed] == ["b.evil.test", "c.evil.test"]
    assert guard.lost == 1
    records.failing = False
    _ask(guard, "d.evil.test")
    assert [r.host for r in records] == ["b.evil.test", "c.evil.test", "d.evil.test"]
    assert guard.lost == 0


class _Recorder:
    """A UDP resolver on loopback that answers every query twice: first a stale
    answer (another id), then the real one; it records each query's source port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sources: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """No thread left behind: one with signals unblocked would take a SIGTERM that
        another test sends itself, blocked, and the test process would end."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"stop", ("127.0.0.1", self.port))
        self.thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while True:
            data, peer = self.sock.recvfrom(4096)
            if data == b"stop":
                return
            self.sources.append(peer[1])
            query = DNSRecord.parse(data)
            stale = query.reply()
            stale.header.id = (query.header.id + 1) % 65536
            stale.add_answer(RR(query.q.qname, rdata=A("198.18.0.99")))
            self.sock.sendto(stale.pack(), peer)
            reply = query.reply()
            reply.add_answer(RR(query.q.qname, rdata=A("198.18.0.7")))
            self.sock.sendto(reply.pack(), peer)


def test_udp_upstream_keeps_its_source_port_and_skips_answers_not_to_its_query() -> None:
    """The guard's source port stays bound, below the ephemeral range (no user socket
    is ever given it and so rides the guard's conntrack entry); a late answer to
    another query is not taken."""
    server = _Recorder()
    up = Upstream(["127.0.0.1"], timeout=1.0, port=server.port)
    try:
        _check_ports_and_answers(server, up)
    finally:
        up.pool.shutdown(wait=True)
        server.close()


def _check_ports_and_answers(server: _Recorder, up: Upstream) -> None:
    def ask(name: str) -> list[str]:
        reply = up.pool.submit(up.ask, build_query(name), False).result()
        assert reply is not None
        return [str(rr.rdata) for rr in DNSRecord.parse(reply).rr]

    assert [ask("api.github.com") for _ in range(3)] == [["198.18.0.7"]] * 3
    assert len(server.sources) == 3 and len(set(server.sources)) == 1, server.sources
    assert server.sources[0] in UPSTREAM_PORTS
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other, pytest.raises(OSError):
        other.bind(("0.0.0.0", server.sources[0]))  # taken while the guard runs
