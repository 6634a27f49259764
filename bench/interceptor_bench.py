"""Interceptor benchmark (a script, not a test): run as root, prints figures and ratios.

    /opt/sp-venv/bin/python bench/interceptor_bench.py [--quick]

Side by side, in one run, on the namespace setup of the e2e tests (a box and a
net host joined by a veth): keep-alive HTTPS requests per second and p50/p99
latency for 1 and 32 connections, (a) directly to the upstream server, (b)
through plain mitmproxy in transparent mode with no addon, (c) through the
interceptor (enforce policy, every request logged); new TLS connections per
second; the interceptor's RSS before and after 50,000 requests.

The upstream server and the load generator are Node.js (fast enough not to be
the bottleneck); each path is chosen by the client's uid: one uid is
redirected to the interceptor, one to plain mitmproxy, one goes direct.
Bounded: fixed request counts, every step under a timeout, loopback and
namespaces only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.policy import Mode, Policy, make_rule  # noqa: E402
from runtime.resolve import write_policy  # noqa: E402
from tests.harness import Topology, cleanup_leftovers, python_bin, stage_source  # noqa: E402
from tests.harness.upstream import UpstreamCA  # noqa: E402

PROXY_UID = 64201
UID_INTERCEPTOR, UID_PLAIN, UID_DIRECT = 64202, 64203, 64204
PORT_INTERCEPTOR, PORT_PLAIN = 58080, 58081
NAME = "bench.test"

UPSTREAM_JS = r"""
const https = require('https'), fs = require('fs');
const [cert, key] = process.argv.slice(2);
const body = Buffer.from('{"ok":true}\n');
const srv = https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key),
                                keepAliveTimeout: 60000}, (req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, {'content-type': 'application/json', 'content-length': body.length});
    res.end(body);
  });
});
srv.listen({port: 443, host: '::', ipv6Only: false}, () => console.log('READY'));
"""

CLIENT_JS = r"""
const https = require('https'), fs = require('fs');
const [url, conns, total, caFile, keepAlive, deadlineS] = process.argv.slice(2);
const N = +conns, TOTAL = +total, ka = keepAlive === '1';
const ca = fs.readFileSync(caFile);
const agent = new https.Agent({keepAlive: ka, maxSockets: N, maxCachedSessions: ka ? 100 : 0, ca});
const lat = []; let done = 0, started = 0, errors = 0; const statuses = {};
const t0 = process.hrtime.bigint(); const deadline = Date.now() + (+deadlineS) * 1000;
function one() {
  return new Promise((resolve) => {
    const s = process.hrtime.bigint();
    const req = https.get(url, {agent}, (res) => {
      res.on('data', () => {});
      res.on('end', () => {
        lat.push(Number(process.hrtime.bigint() - s) / 1e6);
        statuses[res.statusCode] = (statuses[res.statusCode] || 0) + 1; resolve();
      });
    });
    req.on('error', () => { errors++; resolve(); });
  });
}
async function worker() {
  while (started < TOTAL && Date.now() < deadline) { started++; await one(); done++; }
}
Promise.all(Array.from({length: N}, worker)).then(() => {
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  lat.sort((a, b) => a - b);
  const q = (p) => lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] : null;
  console.log(JSON.stringify({requests: done, errors, statuses, seconds: secs,
    rps: done / secs, p50_ms: q(0.5), p99_ms: q(0.99)}));
  agent.destroy();
});
"""


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60, **kw)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_file(path: Path, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    import mitmproxy.version

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "node": node,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces, iptables)", file=sys.stderr)
        return 2
    scale = 0.1 if args.quick else 1.0
    counts = {1: int(3000 * scale), 32: int(12000 * scale)}
    new_conns = int(600 * scale)
    rss_requests = int(50000 * scale)

    cleanup_leftovers()
    work = Path(tempfile.mkdtemp(prefix="sp-bench-", dir="/tmp"))
    work.chmod(0o755)
    source = stage_source(work / "src")
    results: dict[str, Any] = {"machine": machine(), "runs": []}
    with Topology(hosts={NAME: "198.18.0.1"}) as topo:
        topo.set_hosts({NAME: topo.net_ip})
        ca = UpstreamCA.create(work / "upstream", names=[NAME])
        ca.server_key.chmod(0o644)  # the node server runs as root anyway; keep it simple
        (work / "upstream.js").write_text(UPSTREAM_JS)
        (work / "client.js").write_text(CLIENT_JS)
        for f in ("upstream.js", "client.js"):
            (work / f).chmod(0o644)
        upstream = topo.net_popen(
            ["node", str(work / "upstream.js"), str(ca.server_cert), str(ca.server_key)],
            text=True,
        )
        assert upstream.stdout.readline().strip() == "READY"

        for tool in ("iptables-legacy", "ip6tables-legacy"):
            for uid, port in ((UID_INTERCEPTOR, PORT_INTERCEPTOR), (UID_PLAIN, PORT_PLAIN)):
                topo.box_run(
                    [
                        tool,
                        "-w",
                        "-t",
                        "nat",
                        "-A",
                        "OUTPUT",
                        "-p",
                        "tcp",
                        "-m",
                        "owner",
                        "--uid-owner",
                        str(uid),
                        "--dport",
                        "443",
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        str(port),
                    ],
                    check=True,
                )

        for d in ("run", "logs", "ca", "confdir", "plainconf"):
            (work / d).mkdir(mode=0o755)
            os.chown(work / d, PROXY_UID, PROXY_UID)
        policy = work / "run" / "policy.json"
        write_policy(
            Policy.build(Mode.ENFORCE, True, [make_rule(NAME, ["/api/"])], "bench"), policy
        )
        marker = work / "run" / "ready"
        py_env = {"PYTHONPATH": source, "SECURE_PROXY_UPSTREAM_CA": str(ca.ca_cert)}
        interceptor = topo.box_popen(
            [
                python_bin(),
                "-m",
                "runtime.interceptor",
                "--port",
                str(PORT_INTERCEPTOR),
                "--policy",
                str(policy),
                "--confdir",
                str(work / "confdir"),
                "--traffic-log",
                str(work / "logs" / "traffic.jsonl"),
                "--ca-cert",
                str(work / "ca" / "ca.pem"),
                "--ready-marker",
                str(marker),
            ],
            user=PROXY_UID,
            env=py_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_file(marker, interceptor, "interceptor")
        # Plain mitmproxy: same options, no addon; it verifies upstream with the same bundle.
        mitmdump = str(Path(python_bin()).parent / "mitmdump")
        plain = topo.box_popen(
            [
                mitmdump,
                "-q",
                "--mode",
                f"transparent@{PORT_PLAIN}",
                "--set",
                f"confdir={work / 'plainconf'}",
                "--set",
                "connection_strategy=lazy",
                "--set",
                "onboarding=false",
                "--set",
                "flow_detail=0",
                "--set",
                "stream_large_bodies=1m",
                "--set",
                "block_global=false",
                "--set",
                f"ssl_verify_upstream_trusted_ca={work / 'confdir' / 'upstream-trust.pem'}",
            ],
            user=PROXY_UID,
            env={"HOME": str(work / "plainconf")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_file(work / "plainconf" / "mitmproxy-ca-cert.pem", plain, "mitmdump")
        topo.wait_tcp(topo.box, "127.0.0.1", PORT_PLAIN, proc=plain)

        paths = {
            "direct": (UID_DIRECT, ca.ca_cert),
            "mitmproxy": (UID_PLAIN, work / "plainconf" / "mitmproxy-ca-cert.pem"),
            "interceptor": (UID_INTERCEPTOR, work / "ca" / "ca.pem"),
        }
        url = f"https://{NAME}/api/items?page=1"

        def client(
            path: str, conns: int, total: int, keep_alive: bool, deadline: int = 120
        ) -> dict[str, Any]:
            uid, cafile = paths[path]
            argv = ["node", str(work / "client.js"), url, str(conns), str(total), str(cafile)]
            argv += ["1" if keep_alive else "0", str(deadline)]
            r = topo.box_run(argv, user=uid, timeout=deadline + 60)
            if r.returncode != 0:
                raise RuntimeError(f"{path}: {r.stderr}")
            out = json.loads(r.stdout)
            if out["errors"] or set(out["statuses"]) != {"200"}:
                raise RuntimeError(f"{path}: {out}")
            return out

        for path in paths:  # warm up: CA generation, cert cache, JIT
            client(path, 4, 200, True)

        table: dict[tuple[str, int], dict[str, Any]] = {}
        for conns in (1, 32):
            for path in paths:
                out = client(path, conns, counts[conns], True)
                table[(path, conns)] = out
                results["runs"].append({"path": path, "connections": conns, **out})
                print(
                    f"keep-alive {path:12s} conns={conns:2d}: {out['rps']:8.0f} req/s  "
                    f"p50 {out['p50_ms']:7.2f} ms  p99 {out['p99_ms']:7.2f} ms  "
                    f"({out['requests']} requests)",
                    flush=True,
                )
        newconn: dict[str, dict[str, Any]] = {}
        for path in paths:
            out = client(path, 8, new_conns, False)
            newconn[path] = out
            results["runs"].append({"path": path, "new_connections": True, **out})
            print(
                f"new TLS conn {path:12s} conns=8: {out['rps']:8.0f} conn/s  "
                f"p50 {out['p50_ms']:7.2f} ms  p99 {out['p99_ms']:7.2f} ms",
                flush=True,
            )

        before = rss_kib(interceptor.pid)
        t0 = time.monotonic()
        out = client("interceptor", 32, rss_requests, True, deadline=400)
        after = rss_kib(interceptor.pid)
        log_lines = sum(1 for _ in (work / "logs" / "traffic.jsonl").open())
        results["rss"] = {
            "requests": out["requests"],
            "before_kib": before,
            "after_kib": after,
            "seconds": round(time.monotonic() - t0, 1),
            "log_lines_total": log_lines,
        }
        print(
            f"interceptor RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after "
            f"{out['requests']} requests (+{(after - before) / 1024:.1f} MiB); "
            f"{log_lines} log lines in total",
            flush=True,
        )

        print("\nratios (interceptor / other):")
        ratios = {}
        for conns in (1, 32):
            ic = table[("interceptor", conns)]
            for other in ("direct", "mitmproxy"):
                o = table[(other, conns)]
                key = f"conns={conns} vs {other}"
                ratios[key] = {
                    "rps": ic["rps"] / o["rps"],
                    "p50": ic["p50_ms"] / o["p50_ms"],
                    "p99": ic["p99_ms"] / o["p99_ms"],
                }
                print(
                    f"  {key:22s} throughput x{ratios[key]['rps']:.2f}  "
                    f"p50 x{ratios[key]['p50']:.2f}  p99 x{ratios[key]['p99']:.2f}"
                )
        for other in ("direct", "mitmproxy"):
            r = newconn["interceptor"]["rps"] / newconn[other]["rps"]
            ratios[f"new TLS conn/s vs {other}"] = {"rps": r}
            print(f"  new TLS conn/s vs {other:10s} x{r:.2f}")
        results["ratios"] = ratios
        print("\nmachine:", json.dumps(results["machine"]))
        topo.stop(interceptor)
        topo.stop(plain)
        topo.stop(upstream)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
