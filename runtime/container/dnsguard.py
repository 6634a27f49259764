"""secure-proxy-dnsguard: the only resolver the user's DNS reaches while rules apply.

The firewall redirects every DNS packet (UDP and TCP 53, IPv4 and IPv6) that is
not proxy-user's to this process, which runs as proxy-user and is the only one
allowed to reach the resolvers of resolv.conf. A query name is the data an agent
would smuggle out, so a name is forwarded only when the policy could allow a
request to it (the same host matching as the interceptor: exact hosts, names
under allowed wildcards, the built-in hosts):

    allowed name                  forwarded to the resolv.conf servers, answer relayed
    other name, enforce mode      NXDOMAIN, nothing leaves the box
    other name, monitor mode      forwarded, recorded as a violation
    not a DNS query               dropped (UDP) or the connection closed (TCP)

A name a rule gives `ports` (Policy.ports_for) has its answer's addresses sent to the
port keeper (runtime.container.portkeeper), which opens those ports to them in the
firewall, before the answer goes back: the client cannot connect before the entry
exists. If the keeper does not confirm, the answer still goes out and the connection
is refused (fail closed; logged here).

Every query is one traffic-log record (`kind: "dns"`) when the policy logs, and
nothing is answered unlogged: a query whose line cannot be written gets SERVFAIL
instead of its answer, and while the log stays unwritable no name is forwarded at
all (see Guard). Wire format: dnslib, never hand-written parsing.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, RCODE, DNSError, DNSRecord
from loguru import logger

from runtime.core.hosts import HostError, normalize_host
from runtime.core.policy import Action, Decision, Mode, Policy, Reason
from runtime.core.record import DnsRecord, format_ts

#: How long one upstream resolver gets before the next is tried.
UPSTREAM_TIMEOUT = 2.0
#: Source ports of the guard's upstream UDP sockets: below Linux's ephemeral range
#: (32768-60999), so no other socket is ever given one by the kernel (see Upstream).
UPSTREAM_PORTS = range(20053, 20053 + 128)
#: Refusals kept to be logged once the log can be written again (the oldest go first).
MAX_OWED_LINES = 1024
MAX_TCP_MESSAGE = 65535
OPCODE_QUERY = 0


def judge_name(policy: Policy, name: str) -> Decision:
    """Whether the policy could allow any request to `name` (the DNS guard's question).

    Host matching is the policy's own (Policy.rules_naming: HTTP rules and rules
    that open ports); a name that is
    not a valid host is never allowed while rules apply.
    """
    if policy.mode is Mode.ALLOW_ALL:
        return Decision(Action.ALLOW, Reason.ALLOW_ALL, policy.mode, name.rstrip("."), "")
    action = Action.VIOLATION if policy.mode is Mode.MONITOR else Action.BLOCK
    try:
        host = normalize_host(name)
    except HostError:
        return Decision(action, Reason.HOST_NOT_ALLOWED, policy.mode, name.rstrip("."), "")
    rules = policy.rules_naming(host)
    if rules:
        return Decision(Action.ALLOW, Reason.RULE_MATCH, policy.mode, host, "", rules[0])
    return Decision(action, Reason.HOST_NOT_ALLOWED, policy.mode, host, "")


@dataclass(frozen=True, slots=True)
class Query:
    record: DNSRecord
    name: str
    qtype: str


def parse_query(data: bytes) -> Query | None:
    """A standard query with exactly one question, or None (anything else is dropped)."""
    try:
        record = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, struct.error, UnicodeError):
        return None
    header = record.header
    if header.qr or header.opcode != OPCODE_QUERY or len(record.questions) != 1:
        return None
    question = record.questions[0]
    return Query(record, str(question.qname), QTYPE.get(question.qtype, str(question.qtype)))


def nxdomain(query: Query) -> bytes:
    reply = query.record.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    return reply.pack()


def answer_count(data: bytes) -> tuple[str, int]:
    """(rcode name, number of answer records) of an upstream response."""
    try:
        record = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, struct.error, UnicodeError):
        return "FORMERR", 0
    return RCODE.get(record.header.rcode, str(record.header.rcode)), len(record.rr)


def _owner(label: Any) -> str:
    return str(label).lower().rstrip(".")


def answer_addresses(data: bytes, name: str) -> tuple[list[str], int]:
    """(the A and AAAA addresses an answer gives `name`, the name asked, their smallest TTL).

    Only the answer section's records of the name and of the names its CNAMEs lead to:
    those are all a client takes from it. An upstream may add records for any other
    name (or put them in the additional section), or answer another question (a TCP
    answer's is not compared with the query's); opening a port to those would open it
    to addresses the rule's name never resolved to."""
    try:
        record = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, struct.error, UnicodeError):
        return [], 0
    chain = {_owner(name)}
    cnames = [
        (_owner(rr.rname), _owner(rr.rdata.label)) for rr in record.rr if rr.rtype == QTYPE.CNAME
    ]
    grew = True
    while grew:  # the CNAMEs may come in any order
        grew = False
        for owner, target in cnames:
            if owner in chain and target not in chain:
                chain.add(target)
                grew = True
    found = [
        rr for rr in record.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA) and _owner(rr.rname) in chain
    ]
    return [str(rr.rdata) for rr in found], min((rr.ttl for rr in found), default=0)


#: What the guard asks the port keeper: (name, addresses, ttl) -> the endpoints opened,
#: or None when the keeper did not confirm.
Opener = Callable[[str, list[str], int], list[str] | None]


class PortOpener:
    """The port keeper's client: one SOCK_SEQPACKET connection per answer (only names
    a rule gives ports get here), a bounded wait for the keeper's reply."""

    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout

    def __call__(self, name: str, addresses: list[str], ttl: int) -> list[str] | None:
        message = json.dumps({"name": name, "addresses": addresses, "ttl": ttl}).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.send(message)
                reply = json.loads(sock.recv(65536) or b"{}")
        except (OSError, ValueError) as exc:
            logger.error(
                "port keeper unreachable ({}): the ports of {} stay closed (fail closed)", exc, name
            )
            return None
        if "opened" not in reply:
            logger.error("port keeper: {} for {} (fail closed)", reply.get("error", reply), name)
            return None
        return [str(x) for x in reply["opened"]]


def servfail(query: Query) -> bytes:
    reply = query.record.reply()
    reply.header.rcode = RCODE.SERVFAIL
    return reply.pack()


class Upstream:
    """The resolv.conf servers, asked in order (blocking sockets in a thread pool).

    UDP goes out through one connected socket per worker thread and server, kept for
    the guard's life and bound to a port of UPSTREAM_PORTS. A user's query sent from
    a source port the guard used for the same resolver (its conntrack entry lives on
    for minutes, across a restart of the guard) belongs to the guard's flow and is
    not redirected to us; the firewall refuses it, a failed lookup. Ports outside the
    ephemeral range are never handed to a user socket, and a restarted guard binds
    the same ones again, so that cannot happen by chance. (A port it cannot bind is
    skipped; with none left it takes an ephemeral one.)
    """

    def __init__(
        self, servers: Sequence[str], timeout: float = UPSTREAM_TIMEOUT, port: int = 53
    ) -> None:
        self.servers = [s.split("%", 1)[0] for s in servers]
        self.timeout = timeout
        self.port = port
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="dns-upstream")
        self._local = threading.local()  # .udp: server -> this thread's socket to it
        self._free_ports = list(UPSTREAM_PORTS)
        self._ports_lock = threading.Lock()

    def ask(self, data: bytes, tcp: bool) -> bytes | None:
        for server in self.servers:
            with contextlib.suppress(OSError):
                return self._ask_tcp(server, data) if tcp else self._ask_udp(server, data)
        return None

    def _udp_socket(self, server: str) -> socket.socket:
        sockets: dict[str, socket.socket] = self._local.__dict__.setdefault("udp", {})
        sock = sockets.get(server)
        if sock is None:
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                self._bind(sock, family)
                sock.connect((server, self.port))
            except OSError:
                self._release(sock)
                raise
            sockets[server] = sock
        return sock

    def _bind(self, sock: socket.socket, family: int) -> None:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        anywhere = "::" if family == socket.AF_INET6 else "0.0.0.0"
        with self._ports_lock:
            for port in list(self._free_ports):
                try:
                    sock.bind((anywhere, port))
                except OSError:
                    continue  # taken by another process: the next one
                self._free_ports.remove(port)
                return
        logger.warning("dns guard: no upstream port free in {}: an ephemeral one", UPSTREAM_PORTS)

    def _release(self, sock: socket.socket) -> None:
        """Close the socket; its port goes back to the free ones."""
        with contextlib.suppress(OSError), self._ports_lock:
            port = sock.getsockname()[1]
            if port in UPSTREAM_PORTS:
                bisect.insort(self._free_ports, port)
        sock.close()

    def _ask_udp(self, server: str, data: bytes) -> bytes:
        sock = self._udp_socket(server)
        deadline = time.monotonic() + self.timeout
        try:
            sock.send(data)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{server} did not answer")
                sock.settimeout(left)
                reply = sock.recv(MAX_TCP_MESSAGE)
                if answers(data, reply):
                    return reply
                # A late answer to an earlier query on this socket that timed out.
        except TimeoutError:
            raise
        except OSError:
            # Refused or unreachable: a fresh socket next time.
            self._local.udp.pop(server, None)
            self._release(sock)
            raise

    def _ask_tcp(self, server: str, data: bytes) -> bytes:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect((server, self.port))
            sock.sendall(struct.pack("!H", len(data)) + data)
            (length,) = struct.unpack("!H", _recv_exact(sock, 2))
            return _recv_exact(sock, length)


def answers(query: bytes, reply: bytes) -> bool:
    """Whether `reply` is the answer to `query`: the same id and the same question."""
    if len(reply) < 12 or reply[:2] != query[:2]:
        return False
    try:
        return DNSRecord.parse(reply).questions == DNSRecord.parse(query).questions
    except (DNSError, ValueError, IndexError, struct.error, UnicodeError):
        return False


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    out = b""
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise ConnectionError("upstream closed the connection")
        out += chunk
    return out


#: Writes one line; True once it is in the log (TrafficLogWriter.write).
Recorder = Callable[[DnsRecord], bool]


def log_unavailable(decision: Decision) -> Decision:
    """A block in every mode: the policy logs every query and its line cannot be written."""
    return Decision(Action.BLOCK, Reason.LOG_UNAVAILABLE, decision.mode, decision.host, "")


class Guard:
    """Judges one query and produces the bytes to answer with (None: answer nothing).

    When the policy logs, nothing is answered unlogged, as the interceptor refuses
    a request whose start line cannot be written: a forwarded query whose line
    fails gets SERVFAIL instead of the answer, and while lines are owed (the log
    failed and has not been written since) an allowed name is refused with
    SERVFAIL before it is forwarded. Each refusal is logged as `log_unavailable`
    once the log can be written again: the owed lines go first, and the first
    one that is written ends the refusals.
    """

    def __init__(
        self, policy: Policy, upstream: Upstream, record: Recorder, opener: Opener | None = None
    ) -> None:
        self.policy = policy
        self.upstream = upstream
        self.record = record
        self.opener = opener
        self.owed: deque[DnsRecord] = deque()
        self.lost = 0  # owed lines dropped past MAX_OWED_LINES since the log last worked

    async def handle(self, data: bytes, tcp: bool) -> bytes | None:
        query = parse_query(data)
        if query is None:
            return None
        started = time.time()
        opened: list[str] | None = None
        policy = self.policy  # one policy per query, even across a reload
        decision = judge_name(policy, query.name)
        if decision.blocked:
            answer = nxdomain(query)
        elif policy.log_to_file and not self._pay_owed():
            # The log still cannot be written: the name does not leave the box.
            decision, answer = log_unavailable(decision), servfail(query)
        else:
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(self.upstream.pool, self.upstream.ask, data, tcp)
            if answer is None:
                answer = servfail(query)
            elif policy.ports_for(decision.host):
                opened = await self._open_ports(decision.host, query.name, answer)
        if not policy.log_to_file:
            return answer
        line = self._line(decision, query, tcp, started, answer, opened)
        if self._pay_owed() and self.record(line):
            return answer
        if not decision.blocked:
            # Forwarded, or refused just now, and not in the log: the client gets no answer
            # (a port it opened closes at its timeout; the client has no address to use).
            decision, answer, opened = log_unavailable(decision), servfail(query), None
        self._owe(self._line(decision, query, tcp, started, answer, opened))
        return answer

    async def _open_ports(self, host: str, name: str, answer: bytes) -> list[str] | None:
        """Have the port keeper open the host's ports to the answer's addresses, and wait
        for it: the reply goes out after. None: nothing to open, or the keeper failed."""
        addresses, ttl = answer_addresses(answer, name)
        if not addresses:
            return None
        if self.opener is None:
            logger.error("no port keeper: the ports of {} stay closed (fail closed)", host)
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.upstream.pool, self.opener, host, addresses, ttl)

    def _pay_owed(self) -> bool:
        """Write the lines still owed, oldest first; True once none is left."""
        while self.owed:
            if not self.record(self.owed[0]):
                return False
            self.owed.popleft()
        if self.lost:
            logger.warning("dns guard: {} refused queries could not be logged", self.lost)
            self.lost = 0
        return True

    def _owe(self, line: DnsRecord) -> None:
        if len(self.owed) >= MAX_OWED_LINES:
            self.owed.popleft()  # the oldest refusal goes unlogged; the log says how many
            self.lost += 1
        self.owed.append(line)

    @staticmethod
    def _line(
        decision: Decision,
        query: Query,
        tcp: bool,
        started: float,
        answer: bytes,
        opened: list[str] | None = None,
    ) -> DnsRecord:
        rcode, answers = answer_count(answer)
        rule = decision.rule
        return DnsRecord(
            ts=format_ts(started),
            action=decision.log_action,
            violation=decision.violation,
            mode=decision.mode.value,
            reason=decision.reason.value,
            rule=rule.host if rule else None,
            rule_source=rule.origin.label if rule else None,
            host=decision.host,
            qtype=query.qtype,
            transport="tcp" if tcp else "udp",
            rcode=rcode,
            answers=answers,
            duration_ms=(time.time() - started) * 1000.0,
            opened=opened,
        )


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()  # strong references until done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.ensure_future(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr: Any) -> None:
        try:
            answer = await self.guard.handle(data, tcp=False)
        except Exception:  # one bad query must not stop the resolver
            logger.exception("dns guard: query failed")
            return
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


async def _serve_tcp(guard: Guard, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while True:
            head = await reader.readexactly(2)
            (length,) = struct.unpack("!H", head)
            data = await reader.readexactly(length)
            answer = await guard.handle(data, tcp=True)
            if answer is None:
                return  # not a DNS query: close
            writer.write(struct.pack("!H", len(answer)) + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def listen(guard: Guard, addresses: Sequence[str], port: int) -> list[Any]:
    """Bind UDP and TCP on every address; returns what to close at shutdown."""
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    for address in addresses:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(guard), local_addr=(address, port)
        )
        servers.append(transport)
        servers.append(
            await asyncio.start_server(
                lambda r, w: _serve_tcp(guard, r, w), address, port, limit=MAX_TCP_MESSAGE + 2
            )
        )
    return servers


# ---------------------------------------------------------------------------
# Process


def listen_addresses() -> list[str]:
    """Loopback, where the firewall's REDIRECT lands: 127.0.0.1, and ::1 where IPv6 exists."""
    addresses = ["127.0.0.1"]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        addresses.append("::1")
    return addresses


async def serve(
    guard: Guard,
    port: int,
    reload: Callable[[], None],
    ready: Callable[[], None],
    addresses: Sequence[str] | None = None,
) -> None:
    import signal

    servers = await listen(guard, addresses or listen_addresses(), port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready()
    await stop.wait()
    for server in servers:
        server.close()
    guard.upstream.pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os
    import sys
    from pathlib import Path

    from firewall.ruleset import parse_resolv_conf
    from runtime import fsutil, paths
    from runtime.policyfile import read_policy
    from runtime.trafficlog import TrafficLogWriter

    ap = argparse.ArgumentParser(prog="secure-proxy-dnsguard", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=paths.DNS_GUARD_PORT)
    ap.add_argument("--policy", type=Path, default=paths.policy_file())
    ap.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"))
    ap.add_argument("--traffic-log", type=Path, default=paths.traffic_log())
    ap.add_argument("--ready-marker", type=Path, default=paths.dnsguard_marker())
    ap.add_argument(
        "--port-keeper",
        type=Path,
        default=paths.portkeeper_socket(),
        help="the port keeper's socket, told the addresses of names a rule gives ports",
    )
    args = ap.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("SECURE_PROXY_LOG_LEVEL", "INFO"))
    try:
        policy = read_policy(args.policy)
        servers = parse_resolv_conf(args.resolv_conf.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("cannot start: {}; the user's DNS stays blocked (fail closed)", exc)
        return 2
    if not servers:
        logger.error("{} names no nameserver; every allowed name gets SERVFAIL", args.resolv_conf)
    writer = TrafficLogWriter(args.traffic_log)
    guard = Guard(policy, Upstream(servers), writer.write, PortOpener(str(args.port_keeper)))
    with contextlib.suppress(OSError):
        args.ready_marker.unlink(missing_ok=True)

    def reload() -> None:
        try:
            guard.policy = read_policy(args.policy)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("policy reload: {} unusable ({}); keeping the policy", args.policy, exc)
            return
        logger.info("policy reloaded: mode {}", guard.policy.mode.value)

    def ready() -> None:
        info = {"pid": os.getpid(), "port": args.port, "upstream": servers}
        fsutil.atomic_write(args.ready_marker, json.dumps(info) + "\n", 0o644)
        logger.info("dns guard ready on port {}, upstream {}", args.port, servers)

    asyncio.run(serve(guard, args.port, reload, ready))
    writer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
