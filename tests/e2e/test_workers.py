"""N interceptor processes (the config's "workers") end to end, through
`copilot_here --engine sandbox` against the test internet.

The agent's command holds keep-alive HTTPS connections and opens new ones; inside
the sandbox `ss` tells which interceptor process (its port, its pid) took each
connection. Checked: with workers 2 both processes serve, each request reaches the
upstream once and has one start and one end line in the traffic log, a worker
killed with -9 leaves the other serving its connections and its pool forks it
again (supervisord's pool process stays); with workers 1 one process on 58080.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness.sandbox import (
    Session,
    client_script,
    enforce,
    host_logs,
    write_config,
)
from tests.harness.upstream import read_records

pytestmark = pytest.mark.e2e

BASE = 58080
HELD = 8  # keep-alive connections the command holds

# The agent's command: HELD connections, one request each, kept open; then, at each
# go-file the test creates, one more request on every held connection ("again") or
# HELD new connections of one request each ("new"). One JSON line per request with
# the client's own port, so the test can tell which worker served it.
CLIENT = r"""
import http.client, json, os, ssl, sys, time
ctx = ssl.create_default_context()
held = int(sys.argv[1])
def request(conn, path):
    try:
        conn.request("GET", path, headers={"Host": "api.github.com"})
        resp = conn.getresponse(); resp.read()
        return resp.status
    except Exception as exc:
        return type(exc).__name__
def wait(name):
    while not os.path.exists("/tmp/" + name):
        time.sleep(0.05)
conns = []
for i in range(held):
    conn = http.client.HTTPSConnection("api.github.com", 443, timeout=5, context=ctx)
    status = request(conn, f"/held/{i}")
    conns.append(conn)
    print(json.dumps({"phase": "held", "i": i, "port": conn.sock.getsockname()[1],
                      "status": status}), flush=True)
print("HELD", flush=True)
wait("go-again")
for i, conn in enumerate(conns):
    port = conn.sock.getsockname()[1] if conn.sock else None
    print(json.dumps({"phase": "again", "i": i, "port": port,
                      "status": request(conn, f"/again/{i}")}), flush=True)
print("AGAIN", flush=True)
wait("go-new")
for i in range(held):
    conn = http.client.HTTPSConnection("api.github.com", 443, timeout=5, context=ctx)
    print(json.dumps({"phase": "new", "i": i, "status": request(conn, f"/new/{i}")}), flush=True)
    conn.close()
print("END", flush=True)
"""


def config(workers: int) -> dict:
    return {**enforce("api.github.com"), "workers": workers}


def served(s: Session) -> dict[int, tuple[int, int]]:
    """The interceptor side of every established connection to a worker port:
    client port -> (worker port, interceptor pid)."""
    out = s.root(["ss", "-Htnp", "state", "established"]).stdout
    conns = {}
    for line in out.splitlines():
        addrs = [f for f in line.split() if re.fullmatch(r"\S*:\d+", f)]
        if len(addrs) < 2:
            continue
        local, peer = addrs[:2]
        port = int(local.rsplit(":", 1)[1])
        pid = re.search(r"pid=(\d+)", line)
        if BASE <= port < BASE + 16 and pid:
            conns[int(peer.rsplit(":", 1)[1])] = (port, int(pid.group(1)))
    return conns


def listening(s: Session) -> set[int]:
    out = s.root(["ss", "-Htln"]).stdout
    ports = {
        int(f.rsplit(":", 1)[1])
        for line in out.splitlines()
        for f in line.split()
        if re.fullmatch(r"\S*:\d+", f)
    }
    return {p for p in ports if BASE <= p < BASE + 16}


def lines_of(s: Session, phase: str, end: str) -> list[dict]:
    got = []
    while True:
        line = s.wait_for(lambda ln: ln == end or ln.startswith("{"))
        if line == end:
            return got
        entry = json.loads(line)
        assert entry["phase"] == phase, entry
        got.append(entry)


def sup_pid(s: Session, name: str) -> int:
    return int(s.root(["supervisorctl", "pid", name]).stdout.strip() or 0)


def log_lines(project: Path, run_paths: set[str]) -> list[dict]:
    log = host_logs(project) / "traffic.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [e for e in entries if e.get("path") in run_paths]


def test_two_workers_share_connections_and_survive_one_killed(internet, project):
    write_config(project, config(2))
    argv = ["--", *client_script(CLIENT), str(HELD)]
    with Session(project, argv, internet) as s:
        held = lines_of(s, "held", "HELD")
        assert [e["status"] for e in held] == [200] * HELD, (held, s.stderr)

        # Both processes listen, on 58080 and 58081, and both took connections.
        assert listening(s) == {BASE, BASE + 1}
        conns = served(s)
        mine = {e["port"]: conns.get(e["port"]) for e in held}
        assert all(mine.values()), (mine, conns)
        per_port = Counter(port for port, _ in mine.values())
        assert set(per_port) == {BASE, BASE + 1}, per_port
        # the nth rules take turns: 8 new connections, 4 each
        assert per_port[BASE] == per_port[BASE + 1] == HELD // 2, per_port
        pids = {port: pid for port, pid in mine.values()}
        assert pids[BASE] != pids[BASE + 1]
        assert pids[BASE] == s.worker_pid(0)
        assert pids[BASE + 1] == s.worker_pid(1)
        pool = sup_pid(s, "interceptor")
        assert pool not in (0, *pids.values())
        # One CA for all: the command trusted one certificate and every handshake passed.

        # Worker 1 killed: worker 0 keeps serving its connections.
        victim = pids[BASE + 1]
        assert s.root(["kill", "-9", str(victim)]).returncode == 0
        time.sleep(0.3)
        assert s.root(["touch", "/tmp/go-again"]).returncode == 0
        again = lines_of(s, "again", "AGAIN")
        worker_of = {e["port"]: mine[e["port"]][0] for e in held}
        for e in again:
            if worker_of[e["port"]] == BASE:
                assert e["status"] == 200, again
            else:
                assert e["status"] != 200, again  # its process is gone: fails, never around

        # The pool forks it again: a new pid on 58081, and new connections on both again;
        # the pool itself (supervisord's process) and worker 0 stay.
        deadline = time.monotonic() + 20
        while True:
            status = s.root(["supervisorctl", "status", "interceptor"]).stdout
            pid = s.worker_pid(1)
            marker = s.root(["cat", "/run/secure-proxy/interceptor/interceptor-1.ready"]).stdout
            if (
                "RUNNING" in status
                and pid not in (0, victim)
                and f'"pid": {pid}' in marker
                and BASE + 1 in listening(s)
            ):
                break
            assert time.monotonic() < deadline, (status, marker)
            time.sleep(0.2)
        assert sup_pid(s, "interceptor") == pool and s.worker_pid(0) == pids[BASE]
        assert s.root(["touch", "/tmp/go-new"]).returncode == 0
        new = lines_of(s, "new", "END")
        assert [e["status"] for e in new] == [200] * HELD, new
        assert s.wait(timeout=20) == 0, s.stderr

    # Every request that was answered reached the upstream once and is logged once:
    # one start and one end line, under one id; the failed ones are nowhere.
    answered = {f"/held/{i}" for i in range(HELD)} | {f"/new/{i}" for i in range(HELD)}
    answered |= {f"/again/{e['i']}" for e in again if e["status"] == 200}
    failed = {f"/again/{e['i']}" for e in again if e["status"] != 200}
    assert len(failed) == HELD // 2
    arrived = Counter(
        r["path"]
        for r in read_records(internet.record)
        if r.get("ev") == "request" and r["path"] in answered | failed
    )
    assert arrived == Counter(answered), arrived
    lines = log_lines(project, answered | failed)
    phases = Counter((e["path"], e["phase"]) for e in lines)
    assert phases == Counter({(p, ph): 1 for p in answered for ph in ("start", "end")}), phases
    ids = Counter(e["id"] for e in lines)
    assert len(ids) == len(answered) and set(ids.values()) == {2}, ids


def test_one_worker_is_one_process(internet, project):
    write_config(project, config(1))
    argv = ["--", *client_script(CLIENT), "4"]
    with Session(project, argv, internet) as s:
        held = lines_of(s, "held", "HELD")
        assert [e["status"] for e in held] == [200] * 4, (held, s.stderr)
        assert listening(s) == {BASE}
        conns = served(s)
        assert {conns[e["port"]][0] for e in held} == {BASE}, conns
        assert s.worker_pid(0) == conns[held[0]["port"]][1] and s.worker_pid(1) == 0
        nat = s.root(["iptables-legacy-save", "-t", "nat"]).stdout
        assert "statistic" not in nat and "--to-ports 58080" in nat, nat
        markers = s.root(["ls", "/run/secure-proxy/interceptor"]).stdout.split()
        assert [m for m in markers if m.startswith("interceptor")] == ["interceptor.ready"], markers
