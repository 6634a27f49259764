"""The fault matrix's moving parts (tests/e2e/test_faults.py): the load the agent runs,
the probes it opens connections with, and the per-case bookkeeping.

Every request carries a unique id in its path (`/allow/<id>` or `/deny/<id>`), so
the upstream's own record (tests.harness.upstream --record) says which requests
reached it, and the traffic log's start lines say which of those were logged.
An id is `<run>.<source>.<n>`: `<run>` is the matrix run, `<source>` a load client
(`c0`, `c1`, ...) or a probe's case tag.

Load and probes print one JSON line per request: `t` (start, epoch seconds), `d`
(duration), `id`, `kind` (`allow-...` must succeed when healthy, `deny-...` must
never reach the upstream) and `status` (HTTP status, 0 when no answer came).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .sandbox import Session
from .upstream import read_records

#: The load: CLIENTS threads, each looping over the URLs (a `{id}` in each) with a
#: pause between rounds, until the stop file appears, the time limit passes or the
#: request budget is spent. Exit 0 always: it is the user command, and a failed
#: request is an answer, not a crash. A request that went around the interceptor
#: would verify (the upstream CA is trusted too) and so be seen by the upstream.
LOAD = r"""
import json, os, ssl, sys, threading, time, urllib.error, urllib.request
run, clients, period, limit, budget, stop = sys.argv[1:7]
clients, period, limit, budget = int(clients), float(period), float(limit), int(budget)
urls = [u.split("=", 1) for u in sys.argv[7:]]
ctx = ssl.create_default_context()
ctx.load_verify_locations("/ca/upstream-ca.pem")
lock = threading.Lock()
sent = [0]
end = time.monotonic() + limit
def go():
    return time.monotonic() < end and sent[0] < budget and not os.path.exists(stop)
def client(c):
    n = 0
    while go():
        for kind, template in urls:
            rid = f"{run}.c{c}.{n}"
            n += 1
            with lock:
                sent[0] += 1
            out = {"id": rid, "kind": kind, "t": time.time()}
            try:
                with urllib.request.urlopen(template.replace("{id}", rid), timeout=3,
                                            context=ctx) as r:
                    r.read()
                    out["status"] = r.status
            except urllib.error.HTTPError as e:
                out["status"] = e.code
            except Exception as e:
                out["status"] = 0
                out["err"] = (type(e).__name__ + ": " + str(e))[:100]
            out["d"] = round(time.time() - out["t"], 4)
            with lock:
                print(json.dumps(out), flush=True)
        time.sleep(period)
print("LOAD-START", flush=True)
threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("LOAD-END", json.dumps({"sent": sent[0]}), flush=True)
"""

#: N connections open at once (asyncio), to allowed and forbidden targets in turn;
#: each sends its request only once all are open (or half the time limit passed).
#: Prints one JSON line per connection, a summary and PROBE-END.
BURST = r"""
import asyncio, json, resource, socket, ssl, sys, time
run, tag, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = ssl.create_default_context()
ctx.load_verify_locations("/ca/upstream-ca.pem")
# Three in ten allowed (each an upstream connection), one in five over TLS (a
# handshake each at the interceptor): the costly parts, kept so the burst fits
# well under its time limit on a busy machine.
TARGETS = [("allow-http", "api.github.com", 80, "allow"), ("deny-http", "evil.test", 80, "deny"),
           ("deny-http", "evil.test", 80, "deny"), ("allow-https", "api.github.com", 443, "allow"),
           ("deny-http", "evil.test", 80, "deny"), ("deny-http", "evil.test", 80, "deny"),
           ("allow-http", "api.github.com", 80, "allow"), ("deny-http", "evil.test", 80, "deny"),
           ("deny-https", "evil.test", 443, "deny"), ("deny-http", "evil.test", 80, "deny")]
addr = {h: socket.gethostbyname(h) for _, h, _, _ in TARGETS}
opened, peak, start, marks = 0, 0, time.time(), {}
all_open = asyncio.Event()
async def one(i):
    global opened, peak
    kind, host, port, verb = TARGETS[i % len(TARGETS)]
    rid = f"{run}.{tag}.{i}"
    out = {"id": rid, "kind": kind, "t": time.time(), "status": 0}
    w = None
    try:
        tls = {"ssl": ctx, "server_hostname": host} if port == 443 else {}
        r, w = await asyncio.wait_for(asyncio.open_connection(addr[host], port, **tls), limit / 2)
        opened += 1
        peak = max(peak, opened)
        if opened == n:
            all_open.set()
            marks["all_open"] = round(time.time() - start, 2)
        try:
            await asyncio.wait_for(all_open.wait(), max(0.1, start + limit / 2 - time.time()))
        except asyncio.TimeoutError:
            pass
        head = f"GET /{verb}/{rid} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        w.write(head.encode())
        line = await asyncio.wait_for(r.readline(), max(0.1, start + limit - time.time()))
        out["status"] = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except Exception as e:
        out["err"] = type(e).__name__
    finally:
        if w is not None:
            opened -= 1
            w.close()
    out["d"] = round(time.time() - out["t"], 4)
    return out
async def main():
    return await asyncio.gather(*(one(i) for i in range(n)))
results = asyncio.run(main())
for out in results:
    print(json.dumps(out))
summary = {"connections": n, "peak_open": peak, "seconds": round(time.time() - start, 2), **marks}
print("SUMMARY", json.dumps(summary))
print("PROBE-END", flush=True)
"""

#: Slowloris: N connections that send their request head a line a second for HOLD
#: seconds (half TLS to an allowed host, half plain HTTP to a forbidden one), then
#: finish it. `done` is when the head was complete.
SLOW = r"""
import asyncio, json, socket, ssl, sys, time
run, tag, n, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context()
TARGETS = [("allow-https", "api.github.com", 443, "allow"), ("deny-http", "evil.test", 80, "deny")]
addr = {h: socket.gethostbyname(h) for _, h, _, _ in TARGETS}
async def one(i):
    kind, host, port, verb = TARGETS[i % len(TARGETS)]
    rid = f"{run}.{tag}.{i}"
    out = {"id": rid, "kind": kind, "t": time.time(), "status": 0}
    try:
        tls = {"ssl": ctx, "server_hostname": host} if port == 443 else {}
        r, w = await asyncio.wait_for(asyncio.open_connection(addr[host], port, **tls), 15)
        w.write(f"GET /{verb}/{rid} HTTP/1.1\r\nHost: {host}\r\n".encode())
        for k in range(hold):
            await asyncio.sleep(1)
            w.write(f"X-Slow-{k}: {k}\r\n".encode())
            await w.drain()
        out["done"] = time.time()
        w.write(b"Connection: close\r\n\r\n")
        line = await asyncio.wait_for(r.readline(), 15)
        out["status"] = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
        w.close()
    except Exception as e:
        out["err"] = type(e).__name__
    out["d"] = round(time.time() - out["t"], 4)
    return out
async def main():
    return await asyncio.gather(*(one(i) for i in range(n)))
for out in asyncio.run(main()):
    print(json.dumps(out))
print("PROBE-END", flush=True)
"""

#: Requests, one after the other, to each URL template given (`kind=url`).
REQUESTS = r"""
import json, ssl, sys, time, urllib.error, urllib.request
run, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context()
n = 0
for _ in range(count):
    for kind, template in (u.split("=", 1) for u in sys.argv[4:]):
        rid = f"{run}.{tag}.{n}"
        n += 1
        out = {"id": rid, "kind": kind, "t": time.time()}
        try:
            with urllib.request.urlopen(template.replace("{id}", rid), timeout=5,
                                        context=ctx) as r:
                out["status"] = r.status
        except urllib.error.HTTPError as e:
            out["status"] = e.code
            out["body"] = e.read().decode(errors="replace")[:300]
        except Exception as e:
            out["status"] = 0
            out["err"] = (type(e).__name__ + ": " + str(e))[:100]
        out["d"] = round(time.time() - out["t"], 4)
        print(json.dumps(out), flush=True)
print("PROBE-END", flush=True)
"""


def probe_lines(stdout: str) -> list[dict[str, Any]]:
    """The per-request lines of a probe, which must have reached its end marker."""
    lines = stdout.splitlines()
    assert "PROBE-END" in lines, stdout[-2000:]
    return [json.loads(line) for line in lines if line.startswith("{")]


def id_of(path: str) -> str | None:
    """The request id in an `/allow/<id>` or `/deny/<id>` path."""
    parts = path.split("?", 1)[0].split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("allow", "deny") else None


class LoadReader:
    """Reads the load's stdout (the sandbox command's) in the background."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.entries: list[dict[str, Any]] = []
        self.other: list[str] = []
        self.ended = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                line = self.session.next_line(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                self.ended.set()
                return
            with self._lock:
                if line.startswith("{"):
                    self.entries.append(json.loads(line))
                else:
                    self.other.append(line)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.entries)

    def wait(self, what: str, done: Callable[[list[dict[str, Any]]], bool], limit: float) -> None:
        deadline = time.monotonic() + limit
        while not done(self.snapshot()):
            if self.ended.is_set():
                raise AssertionError(f"the load ended while waiting for {what}: {self.other}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {limit} s; {self.snapshot()[-12:]}")
            time.sleep(0.05)

    def started(self, limit: float = 60) -> None:
        """The load printed LOAD-START: the sandbox is up and the command runs."""
        self.wait("the load's start", lambda _: "LOAD-START" in self.other, limit)

    def settled(self, after: float, limit: float = 20) -> None:
        """Every client has started a request after `after`: all earlier ones are in."""

        def done(entries: list[dict[str, Any]]) -> bool:
            clients = {e["id"].split(".")[1] for e in entries}
            late = {e["id"].split(".")[1] for e in entries if e["t"] > after}
            return bool(clients) and clients <= late

        self.wait("every load client past the case", done, limit)


def allowed(entry: dict[str, Any]) -> bool:
    return str(entry["kind"]).startswith("allow")


def recovered(entries: Sequence[dict[str, Any]], begin: float, clear: float) -> bool:
    """Each allowed kind has succeeded in a request started after the fault was over
    and after the last failure of that kind since `begin`."""
    kinds = {e["kind"] for e in entries if allowed(e)}
    for kind in kinds:
        mine = [e for e in entries if e["kind"] == kind and e["t"] >= begin]
        last_fail = max((e["t"] for e in mine if e["status"] != 200), default=clear)
        if not any(e["status"] == 200 and e["t"] > max(last_fail, clear) for e in mine):
            return False
    return bool(kinds)


def recovery_seconds(
    window: Sequence[dict[str, Any]], later: Sequence[dict[str, Any]], clear: float
) -> float | None:
    """Seconds from the end of the fault to the first allowed success after the last
    allowed failure in the window (the worst kind); None when none failed, inf when
    none succeeded after."""
    worst: float | None = None
    for kind in {e["kind"] for e in window if allowed(e)}:
        fails = [e["t"] for e in window if e["kind"] == kind and e["status"] != 200]
        if not fails:
            continue
        after = [
            e["t"] + e["d"]
            for e in later
            if e["kind"] == kind and e["status"] == 200 and e["t"] > max(fails)
        ]
        seconds = max(0.0, min(after) - clear) if after else math.inf
        worst = seconds if worst is None else max(worst, seconds)
    return worst


@dataclass
class Stats:
    """One row of the table."""

    case: str
    proves: str
    sent: int = 0
    refused: int = 0  # forbidden requests answered without reaching the upstream
    failed: int = 0  # allowed requests that got no 200
    reached: int = 0  # requests the upstream's record shows
    forbidden_reached: int = 0
    unlogged: int = 0  # reached the upstream without a start line
    recovered_after: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    window: dict[str, float] = field(default_factory=dict)  # begin, fault, clear, end

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.recovered_after is not None and math.isinf(self.recovered_after):
            out["recovered_after"] = "never"
        return out


@dataclass
class Case:
    """A fault's time window and its own probe requests."""

    name: str
    proves: str
    begin: float = field(default_factory=time.time)
    fault: float = 0.0  # when it was injected
    clear: float = 0.0  # when it was over (== fault for an instant one)
    end: float = 0.0
    probes: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def inject(self) -> None:
        self.fault = self.clear = time.time()

    def over(self) -> None:
        self.clear = time.time()

    def window(self, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in entries if self.begin <= e["t"] < self.end]


def start_lines(log: Path) -> dict[str, dict[str, Any]]:
    """The traffic log's HTTP start lines by path."""
    out: dict[str, dict[str, Any]] = {}
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind", "http") == "http" and record.get("phase") == "start":
            out[record.get("path") or ""] = record
    return out


def upstream_requests(record_file: Path, run: str) -> dict[str, dict[str, Any]]:
    """The upstream's request records of this run, by request id."""
    out: dict[str, dict[str, Any]] = {}
    for record in read_records(record_file):
        if record.get("ev") != "request":
            continue
        rid = id_of(record["path"])
        if rid and rid.startswith(run + "."):
            out[rid] = record
    return out


def unlogged(reached: Iterable[dict[str, Any]], starts: dict[str, dict[str, Any]]) -> list[str]:
    """Paths that reached the upstream with no start line of the same host and path."""
    missing = []
    for record in reached:
        path = record["path"].split("?", 1)[0]
        start = starts.get(path)
        host = (record.get("host") or "").rsplit(":", 1)[0] if record.get("host") else None
        if start is None or start.get("host") != host:
            missing.append(path)
    return missing


def summarize(
    case: Case,
    entries: Sequence[dict[str, Any]],
    reached_by_id: dict[str, dict[str, Any]],
    starts: dict[str, dict[str, Any]],
) -> Stats:
    window = case.window(entries)
    mine = window + case.probes
    ids = {e["id"] for e in mine}
    reached = [r for rid, r in reached_by_id.items() if rid in ids]
    later = [e for e in entries if e["t"] >= case.begin]
    return Stats(
        case=case.name,
        proves=case.proves,
        sent=len(mine),
        refused=sum(1 for e in mine if not allowed(e) and e["id"] not in reached_by_id),
        failed=sum(1 for e in mine if allowed(e) and e["status"] != 200),
        reached=len(reached),
        forbidden_reached=sum(1 for r in reached if r["path"].startswith("/deny/")),
        unlogged=len(unlogged(reached, starts)),
        recovered_after=recovery_seconds(window, later, case.clear),
        notes=dict(case.notes),
    )
