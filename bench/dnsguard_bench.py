"""DNS guard benchmark (a script, not a test): added latency per query.

    /opt/sp-venv/bin/python bench/dnsguard_bench.py [--queries 2000] [--json out.json]

Side by side in one run, on loopback: a resolver (tests.harness.dns, answering
from a table) asked directly, and the same resolver asked through the DNS
guard (runtime.container.dnsguard, a real process with an enforce policy that
allows the name and logs every query). Reports per-query latency (median, p90,
p99) for UDP and TCP and the ratio guard/direct, plus the cost of a refused
name (answered NXDOMAIN by the guard itself, nothing forwarded).

Bounded: a fixed number of queries, each with a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.core.policy import Mode, Policy, make_rule  # noqa: E402
from tests.harness.dns import DnsServer, build_query, parse_response  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(port: int, name: str, tcp: bool) -> float:
    query = build_query(name)
    start = time.perf_counter()
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(len(query).to_bytes(2, "big") + query)
            length = int.from_bytes(_exact(s, 2), "big")
            answer = _exact(s, length)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(query, ("127.0.0.1", port))
            answer = s.recv(65535)
    elapsed = time.perf_counter() - start
    parse_response(answer)
    return elapsed


def _exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p90_us": pick(0.9),
        "p99_us": pick(0.99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sp-dnsbench-"))
    upstream_port, guard_port = free_port(), free_port()
    policy = Policy.build(Mode.ENFORCE, True, [make_rule("example.com")], "bench")
    (work / "policy.json").write_text(json.dumps(policy.to_json()))
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    results: dict[str, dict[str, float]] = {}
    with DnsServer(["127.0.0.1"], {"example.com": ["198.18.0.1"]}, port=upstream_port):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        guard = subprocess.Popen(
            [
                sys.executable,
                "-c",
                # The guard asks port 53 of its resolv.conf servers; point it at ours.
                "import sys; from runtime.container import dnsguard; "
                f"dnsguard.Upstream.__init__.__defaults__ = (2.0, {upstream_port}); "
                "sys.exit(dnsguard.main(sys.argv[1:]))",
                "--port",
                str(guard_port),
                "--policy",
                str(work / "policy.json"),
                "--resolv-conf",
                str(work / "resolv.conf"),
                "--traffic-log",
                str(work / "traffic.jsonl"),
                "--ready-marker",
                str(work / "ready"),
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not (work / "ready").exists():
                if guard.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the DNS guard did not start")
                time.sleep(0.05)
            for tcp in (False, True):
                proto = "tcp" if tcp else "udp"
                for _ in range(50):  # warm up both paths
                    ask(upstream_port, "example.com", tcp)
                    ask(guard_port, "example.com", tcp)
                direct, guarded, refused = [], [], []
                for _ in range(args.queries):  # interleaved: the same machine state for both
                    direct.append(ask(upstream_port, "example.com", tcp))
                    guarded.append(ask(guard_port, "example.com", tcp))
                    refused.append(ask(guard_port, "exfil.evil.test", tcp))
                results[f"{proto} direct"] = stats(direct)
                results[f"{proto} through the guard"] = stats(guarded)
                results[f"{proto} refused by the guard"] = stats(refused)
                ratio = (
                    results[f"{proto} through the guard"]["median_us"]
                    / results[f"{proto} direct"]["median_us"]
                )
                results[f"{proto} ratio"] = {"guard/direct median": ratio}
        finally:
            guard.terminate()
            guard.wait(timeout=10)
    lines = (work / "traffic.jsonl").read_text().splitlines()
    print(f"machine: {os.cpu_count()} cores; {args.queries} queries per series")
    print(f"traffic-log lines written by the guard: {len(lines)}")
    for key, value in results.items():
        print(f"{key:32s} " + "  ".join(f"{k} {v:8.1f}" for k, v in value.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
