"""Attacks on the interceptor's workers (N mitmproxy processes on 58080..58080+N-1)
by the agent inside `copilot_here --engine sandbox`, with workers 2: connecting to a
worker's port directly (not via the REDIRECT), tricks against every worker, and a
live edit every worker must apply. One sandbox for the module; what arrived is read
from the test internet's own record and the traffic log.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.sandbox import (
    Internet,
    Session,
    client_script,
    enforce,
    host_logs,
    write_config,
)
from tests.harness.upstream import read_records

pytestmark = pytest.mark.e2e

BASE = 58080
NEW = 8  # new connections per probe kind: the nth rules give each worker half
ROUNDS = 4  # rounds of tricks

# The agent. Phase "direct": plain HTTP straight to each worker port, IPv4 and IPv6,
# and to the accepted ports nobody listens on, naming this box (a worker that
# forwarded it would connect to itself) or an allowed host; then requests through
# the REDIRECT. Phase "tricks" (after the test's edit to enforce): NEW new
# connections each of a refused host, an allowed one, and tricks naming the refused
# host. Every probe prints one JSON line; END marks the script's end.
AGENT = r"""
import json, os, socket, ssl, sys, time
NEW = int(sys.argv[1])
ctx = ssl.create_default_context()
def probe(kind, addr, data, tls=None, timeout=4):
    t = time.monotonic()
    try:
        s = socket.create_connection(addr, timeout=timeout)
        if tls:
            s = ctx.wrap_socket(s, server_hostname=tls)
        s.sendall(data)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        out = got.split(b"\r\n", 1)[0].decode(errors="replace")
    except Exception as exc:
        out = type(exc).__name__
    print(json.dumps({"kind": kind, "addr": list(addr), "out": out,
                      "secs": round(time.monotonic() - t, 2)}), flush=True)
def get(path, host):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
def wait(name):
    while not os.path.exists("/tmp/" + name):
        time.sleep(0.05)
for addr in [("127.0.0.1", 58080), ("127.0.0.1", 58081), ("::1", 58080), ("::1", 58081),
             ("127.0.0.1", 58082), ("127.0.0.1", 58083)]:
    for i, name in enumerate(["0.0.0.0", "[::ffff:127.0.0.1]", "api.github.com"]):
        probe("direct", addr, get(f"/direct/{addr[1]}/{i}", name))
squat = []
for addr in [("127.0.0.1", 58082), ("127.0.0.1", 58083), ("::1", 58082), ("::1", 58083)]:
    l = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    l.bind(addr); l.listen(16); l.setblocking(False); squat.append(l)
for i in range(NEW):
    probe("through", ("api.github.com", 443), get(f"/through/{i}", "api.github.com"),
          "api.github.com")
taken = 0
for l in squat:
    try:
        while True:
            l.accept()[0].close(); taken += 1
    except BlockingIOError:
        pass
print(json.dumps({"kind": "squat", "out": taken}), flush=True)
print("DIRECT-DONE", flush=True)
wait("go-tricks")
G, E = ("api.github.com", 443), ("evil.test", 443)
for i in range(int(sys.argv[2])):
    # 7 new connections to 443 and 3 to 80 a round: odd, so that each kind meets
    # both workers in turn (the nth rules count each port's new connections).
    probe("ok", G, get(f"/ok/{i}", "api.github.com"), "api.github.com")
    probe("ok", G, get(f"/ok/{i}b", "api.github.com"), "api.github.com")
    probe("refused", E, get(f"/evil/{i}", "evil.test"), "evil.test")
    probe("mismatch", G, get(f"/mismatch/{i}", "evil.test"), "api.github.com")
    probe("absolute", G, get(f"https://evil.test/abs/{i}", "api.github.com"), "api.github.com")
    probe("connect", G, b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n"
          + get(f"/connect/{i}", "evil.test"), "api.github.com", 2)
    probe("h2c", G, b"GET /h2c/%d HTTP/1.1\r\nHost: evil.test\r\nUpgrade: h2c\r\n"
          b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
          % i, "api.github.com", 2)
    probe("refused", ("evil.test", 80), get(f"/evil80/{i}", "evil.test"))
    probe("raw", ("evil.test", 80), b"\x00\x01 not http\r\n" + get(f"/raw/{i}", "evil.test"), 2)
    probe("h2", ("evil.test", 80), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
          b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", 2)
print("TRICKS-DONE", flush=True)
wait("go-kill")
i, end = 0, time.monotonic() + 7
while time.monotonic() < end:
    probe("k-ok", G, get(f"/k-ok/{i}", "api.github.com"), "api.github.com", 2)
    probe("k-evil", E, get(f"/k-evil/{i}", "evil.test"), "evil.test", 2)
    probe("k-ok", G, get(f"/k-ok/{i}b", "api.github.com"), "api.github.com", 2)
    i += 1  # three a round: each kind meets both workers (the nth rules alternate)
print("END", flush=True)
"""

MONITOR = {**enforce("api.github.com"), "mode": "monitor", "workers": 2}
ENFORCE = {**MONITOR, "mode": "enforce"}


class Run:
    def __init__(self, s: Session, project: Path, internet: Internet) -> None:
        self.s, self.project, self.internet = s, project, internet

    def lines(self, end: str) -> list[dict]:
        got = []
        while True:
            line = self.s.wait_for(lambda ln: ln == end or ln.startswith("{"), timeout=120)
            if line == end:
                return got
            got.append(json.loads(line))

    def arrived(self) -> Counter[str]:
        return Counter(
            r["path"] for r in read_records(self.internet.record) if r.get("ev") == "request"
        )

    def traffic(self) -> list[dict]:
        log = host_logs(self.project) / "traffic.jsonl"
        return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]

    def worker_log(self, n: int) -> str:
        """Worker n's lines of the log the workers share."""
        out = self.s.root(["cat", "/var/log/secure-proxy/interceptor.log"]).stdout
        return "\n".join(ln for ln in out.splitlines() if f"| worker {n} |" in ln)


@pytest.fixture(scope="module")
def run(internet) -> Iterator[Run]:
    project = Path(tempfile.mkdtemp(prefix="sp-proj-", dir="/tmp"))
    os.chmod(project, 0o755)
    write_config(project, MONITOR)
    argv = ["--network-config-write", "--", *client_script(AGENT), str(NEW), str(ROUNDS)]
    try:
        with Session(project, argv, internet) as s:
            yield Run(s, project, internet)
    finally:
        shutil.rmtree(project, ignore_errors=True)


def test_a_worker_port_dialled_directly_serves_nothing_and_cannot_loop(run: Run):
    """Straight to 127.0.0.1/[::1]:58080+n, in monitor mode (everything is forwarded):
    a request naming this box (`0.0.0.0`, `::ffff:127.0.0.1`: mitmproxy's self-connect
    check misses both) made the worker connect to itself, again and again, thousands
    of connections and log lines from one request. Now such a connection is closed
    unread: nothing is judged, forwarded or logged; ports of the accepted range where
    no worker listens refuse; the workers still serve redirected traffic."""
    probes = run.lines("DIRECT-DONE")
    direct = [p for p in probes if p["kind"] == "direct"]
    assert len(direct) == 18, probes
    for p in direct:
        if p["addr"][1] < BASE + 2:
            assert p["out"] in ("", "ConnectionResetError"), p  # closed, no answer
            assert p["secs"] < 2, p
        else:
            assert p["out"] == "ConnectionRefusedError", p
    # The agent listening on the accepted ports where no worker listens gets nothing.
    assert [p["out"] for p in probes if p["kind"] == "squat"] == [0], probes
    through = [p for p in probes if p["kind"] == "through"]
    assert [p["out"] for p in through] == ["HTTP/1.1 200 OK"] * NEW, through
    arrived = run.arrived()
    assert not [p for p in arrived if p.startswith("/direct/")], arrived
    assert all(arrived[f"/through/{i}"] == 1 for i in range(NEW)), arrived
    lines = run.traffic()
    assert not [e for e in lines if "/direct/" in str(e.get("path"))], lines[:5]
    assert len([e for e in lines if str(e.get("path")).startswith("/through/")]) == 2 * NEW
    for n in (0, 1):
        assert "dialled straight to the interceptor" in run.worker_log(n), n


def test_after_a_live_edit_every_worker_refuses_and_no_trick_gets_past(run: Run):
    """The agent edits the writable config from monitor to enforce: both workers reload
    it, and NEW new connections each (half to each worker) of a refused host, domain
    fronting, absolute-form, CONNECT, h2c, HTTP/2 prior knowledge and bytes that are
    not HTTP: nothing of the refused host's arrives, every allowed request does."""
    write_config(run.project, ENFORCE, approve=False)
    deadline = time.monotonic() + 20
    while not all("mode enforce" in run.worker_log(n) for n in (0, 1)):
        assert time.monotonic() < deadline, [run.worker_log(n)[-800:] for n in (0, 1)]
        time.sleep(0.2)
    assert run.s.root(["touch", "/tmp/go-tricks"]).returncode == 0
    probes = run.lines("TRICKS-DONE")
    by_kind: dict[str, list[str]] = {}
    for p in probes:
        by_kind.setdefault(p["kind"], []).append(p["out"])
    assert by_kind["ok"] == ["HTTP/1.1 200 OK"] * 2 * ROUNDS, by_kind
    assert by_kind["refused"] == ["HTTP/1.1 403 Forbidden"] * 2 * ROUNDS, by_kind
    for kind in ("mismatch", "absolute", "connect", "h2c", "raw", "h2"):
        assert len(by_kind[kind]) == ROUNDS, by_kind
        assert not [o for o in by_kind[kind] if "200" in o], (kind, by_kind[kind])
    arrived = run.arrived()
    assert all(arrived[f"/ok/{i}{b}"] == 1 for i in range(ROUNDS) for b in ("", "b")), arrived
    leaked = [
        p
        for p in arrived
        if p.split("/")[1] in ("evil", "mismatch", "abs", "connect", "raw", "h2c")
    ]
    assert leaked == [], leaked
    # no request reached evil.test under any name
    hosts = {r.get("host") for r in read_records(run.internet.record) if r.get("ev") == "request"}
    assert "evil.test" not in hosts, hosts
    # Nothing of the bytes that are not HTTP was answered as a request.
    assert not [o for o in by_kind["raw"] + by_kind["h2"] if o.startswith("HTTP/")], by_kind


def test_a_worker_killed_again_and_again_lets_nothing_out_unjudged_or_unlogged(run: Run):
    """Worker 1 killed with -9 three times while new connections flow (enforce): no
    refused request arrives, every allowed one that arrived was logged (its start line)
    before it went out, and every 200 the agent saw arrived."""
    assert run.s.root(["touch", "/tmp/go-kill"]).returncode == 0
    killed: list[int] = []
    deadline = time.monotonic() + 20
    while len(killed) < 3 and time.monotonic() < deadline:
        pid = run.s.worker_pid(1)  # forked again by its pool after each kill
        if pid and pid not in killed:
            assert run.s.root(["kill", "-9", str(pid)]).returncode == 0
            killed.append(pid)
            time.sleep(1.5)
        else:
            time.sleep(0.1)
    assert len(killed) == 3
    probes = run.lines("END")
    oks = [p for p in probes if p["kind"] == "k-ok"]
    evils = [p for p in probes if p["kind"] == "k-evil"]
    assert len(oks) >= 4 and len(evils) >= 4, probes
    assert not [p for p in evils if "200" in p["out"]], evils
    failed = [p for p in oks if p["out"] != "HTTP/1.1 200 OK"]
    assert 0 < len(failed) < len(oks), oks  # the outages were real, and short
    assert [p for p in evils if p["out"] == "HTTP/1.1 403 Forbidden"], evils
    arrived = run.arrived()
    assert not [p for p in arrived if p.startswith("/k-evil/")], arrived
    got = {p for p in arrived if p.startswith("/k-ok/")}
    assert all(arrived[p] == 1 for p in got), arrived
    assert len(got) >= len(oks) - len(failed)
    phases = Counter(
        (e["path"], e["phase"]) for e in run.traffic() if str(e.get("path")).startswith("/k-ok/")
    )
    # Logged before it went out (a start line each); a kill may cost the end line only.
    starts = {p for (p, ph), n in phases.items() if ph == "start" and n == 1}
    assert starts >= got and all(n == 1 for n in phases.values()), phases
    assert run.s.wait(timeout=30) == 0, run.s.stderr


# The agent at level none (rules off, no log: the network untouched, no interceptor
# running) takes the worker ports, IPv4 and IPv6, before the user's live edit turns
# the rules on and starts the workers; then asks a refused host, straight.
SQUATTER = r"""
import json, os, socket, ssl, sys, time
held = []
for host, port in [("127.0.0.1", 58080), ("127.0.0.1", 58081), ("::1", 58080), ("::1", 58081)]:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, port)); s.listen(64); held.append(s)
print("SQUATTING", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
ctx = ssl.create_default_context(cafile="/ca/upstream-ca.pem")
for i in range(3):
    try:
        c = ctx.wrap_socket(socket.create_connection(("evil.test", 443), timeout=3),
                            server_hostname="evil.test")
        c.sendall(f"GET /after-edit/{i} HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode())
        out = c.recv(100).split(b"\r\n")[0].decode()
    except Exception as exc:
        out = type(exc).__name__
    print(json.dumps({"i": i, "out": out}), flush=True)
print("END", flush=True)
"""


def test_worker_ports_taken_before_a_live_edit_turns_the_rules_on_fail_closed(internet):
    """A live edit from rules off to enforce starts the workers; the agent, free until
    then, holds their ports first, so no worker can start. The new level used to be
    left out of force (the network untouched, the agent free for the rest of the run);
    now the firewall moves to it anyway: traffic fails closed (the agent meets only
    its own listener) and nothing reaches the refused host."""
    project = Path(tempfile.mkdtemp(prefix="sp-proj-", dir="/tmp"))
    os.chmod(project, 0o755)
    try:
        write_config(project, {"enabled": False, "workers": 2})
        argv = ["--network-config-write", "--", *client_script(SQUATTER)]
        with Session(project, argv, internet) as s:
            s.wait_for(lambda ln: ln == "SQUATTING", timeout=60)
            write_config(project, {**enforce("api.github.com"), "workers": 2}, approve=False)
            t0 = time.monotonic()
            deadline = t0 + 60
            while True:
                log = s.root(["cat", "/var/log/secure-proxy/reloader.log"]).stdout
                if "in force" in log:
                    break
                assert time.monotonic() < deadline, log
                time.sleep(0.3)
            # Failed fast (a worker that exits at start is not waited on for 60 s).
            assert "firewall level full in force, failing closed" in log, log
            assert time.monotonic() - t0 < 30, log
            assert s.root(["touch", "/tmp/go"]).returncode == 0
            outs = [
                json.loads(x)["out"]
                for x in [s.wait_for(lambda ln: ln.startswith("{")) for _ in range(3)]
            ]
            s.wait_for(lambda ln: ln == "END")
            assert "HTTP/1.1 200 OK" not in outs, outs
            nat = s.root(["iptables-legacy-save", "-t", "nat"]).stdout
            assert "--to-ports 58081" in nat, (nat, log)
        arrived = [
            r["path"]
            for r in read_records(internet.record)
            if r.get("ev") == "request" and r["path"].startswith("/after-edit/")
        ]
        assert arrived == [], arrived
    finally:
        shutil.rmtree(project, ignore_errors=True)
