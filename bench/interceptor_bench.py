"""Interceptor benchmark (a script, not a test): run as root, prints figures and ratios.

    /opt/sp-venv/bin/python bench/interceptor_bench.py [--quick] [--json out.json]

Side by side, in one run, on the namespace setup of the e2e tests (a box and a
net host joined by a veth): keep-alive HTTPS requests per second and p50/p99
latency for 1 and 32 connections, (a) directly to the upstream server, (b)
through plain mitmproxy in transparent mode with no addon, (c) through the
interceptor (enforce policy, every request logged); new TLS connections per
second. Then, through the interceptor only: the traffic log off, monitor
mode, allow-all with and without the log, and a 1,000-rule policy (each
swapped in with SIGHUP, the interceptor's own reload); 2 interceptor
processes on 58080-58081 with the REDIRECT spread over them per connection
(iptables statistic nth) against 1; the interceptor's RSS idle, warm and
after 100,000 requests.

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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.container import ca as container_ca  # noqa: E402
from runtime.core.policy import Mode, Policy, make_rule  # noqa: E402
from runtime.policyfile import write_policy  # noqa: E402
from tests.harness import Topology, cleanup_leftovers, python_bin, stage_source  # noqa: E402
from tests.harness.upstream import UpstreamCA  # noqa: E402

PROXY_UID = 64201
UID_INTERCEPTOR, UID_PLAIN, UID_DIRECT, UID_SPREAD = 64202, 64203, 64204, 64205
UID_NOLOG = 64206  # a second interceptor whose policy does not log (bulk section)
UID_NGINX = 64207  # nginx terminating and re-originating TLS, in C (bulk section)
PORT_NGINX = 58095
#: Interceptor processes listen on 58080 .. 58080+N-1, as the pool's N workers would.
PORT_INTERCEPTOR, PORT_SECOND, PORT_PLAIN, PORT_NOLOG = 58080, 58081, 58090, 58085
NAME = "bench.test"

UPSTREAM_JS = r"""
const https = require('https'), fs = require('fs');
const [cert, key] = process.argv.slice(2);
const body = Buffer.from('{"ok":true}\n');
const chunk = Buffer.alloc(256 * 1024, 120);
const srv = https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key),
                                keepAliveTimeout: 60000}, (req, res) => {
  const bulk = req.url.match(/^\/api\/bulk\?bytes=(\d+)$/);
  if (bulk) {  // a large download, written as fast as the socket takes it
    req.resume();
    let left = +bulk[1];
    res.writeHead(200, {'content-type': 'application/octet-stream', 'content-length': left});
    const pump = () => {
      while (left > 0) {
        const n = Math.min(left, chunk.length); left -= n;
        if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
          res.once('drain', pump); return;
        }
      }
      res.end();
    };
    return pump();
  }
  let received = 0;  // an upload is counted and the count answered
  req.on('data', (d) => { received += d.length; });
  if (req.url.startsWith('/api/upload')) {
    return req.on('end', () => {
      const b = Buffer.from(JSON.stringify({received}) + '\n');
      res.writeHead(200, {'content-type': 'application/json', 'content-length': b.length});
      res.end(b);
    });
  }
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


def make_init_ca(confdir: Path, published: Path) -> None:
    """The interceptor's CA as the init makes it (P-256, runtime.container.ca), not
    the RSA one mitmproxy would make itself in an empty confdir: the handshakes
    measured are the ones a container runs. Plain mitmproxy keeps its own (RSA)."""
    saved = {k: os.environ.get(k) for k in ("SECURE_PROXY_CONFDIR", "SECURE_PROXY_CA_CERT")}
    os.environ.update(SECURE_PROXY_CONFDIR=str(confdir), SECURE_PROXY_CA_CERT=str(published))
    try:
        container_ca.make_ca((PROXY_UID, PROXY_UID))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def redirect(topo: Topology, uid: int, port: int, extra: list[str] = ()) -> None:
    """REDIRECT the uid's HTTPS (v4 + v6) to a local port; `extra` matches go first."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        argv = [tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner"]
        argv += ["--uid-owner", str(uid), "--dport", "443", *extra]
        argv += ["-j", "REDIRECT", "--to-ports", str(port)]
        topo.box_run(argv, check=True)


def bench_rules(n: int) -> list[Any]:
    """The bench rule first, then n-1 others (exact, wildcard, with paths)."""
    rules = [make_rule(NAME, ["/api/"])]
    for i in range(1, n):
        host = f"*.svc{i}.example.com" if i % 4 == 0 else f"h{i}.corp.internal"
        rules.append(make_rule(host, [f"/v{i}/"]))
    return rules


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


CURL_EXTRA: list[str] = []  # --http1 adds --http1.1


def curl_transfer(
    topo: Topology, uid: int, cafile: Path, direction: str, size: int, upload: Path
) -> dict[str, Any]:
    """One large transfer with curl (one connection): seconds and MB/s, checked complete."""
    argv = ["curl", "-sS", "--fail", *CURL_EXTRA, "--cacert", str(cafile), "-o", "/dev/null"]
    argv += ["-w", "%{time_total} %{size_download} %{size_upload} %{http_code}"]
    if direction == "download":
        argv += [f"https://{NAME}/api/bulk?bytes={size}"]
    else:  # -T streams the file; no Expect: 100-continue round trip
        argv += ["-T", str(upload), "-X", "POST", "-H", "Expect:", f"https://{NAME}/api/upload"]
    r = topo.box_run(argv, user=uid, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"curl {direction}: {r.returncode} {r.stderr}")
    secs, down, up, code = r.stdout.split()
    moved = int(float(down if direction == "download" else up))
    if code != "200" or moved != size:
        raise RuntimeError(f"curl {direction}: status {code}, {moved} of {size} bytes")
    return {"seconds": float(secs), "mb_s": size / 1e6 / float(secs)}


def start_nginx_proxy(topo: Topology, work: Path, upstream_ca: Path) -> tuple[Any, Path]:
    """nginx (C, OpenSSL) doing what the interceptor does to a transfer: TLS terminated
    with a certificate for NAME, the request re-sent over TLS to the upstream (verified),
    bodies streamed both ways (no buffering). One process, as one interceptor worker.
    The ceiling of any TLS-terminating proxy on this machine. Returns it and its CA."""
    binary = shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian nginx)")
    root = work / "nginx"
    (root / "tmp").mkdir(parents=True)
    cert = UpstreamCA.create(root / "ca", names=[NAME])
    conf = root / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  access_log off;
  server {{
    listen 127.0.0.1:{PORT_NGINX} ssl http2;
    listen [::1]:{PORT_NGINX} ssl http2;
    ssl_certificate {cert.server_cert};
    ssl_certificate_key {cert.server_key};
    client_max_body_size 0;
    location / {{
      proxy_pass https://{topo.net_ip}:443;
      proxy_http_version 1.1;
      proxy_set_header Host {NAME};
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_ssl_server_name on;
      proxy_ssl_name {NAME};
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {upstream_ca};
    }}
  }}
}}
"""
    )
    proc = topo.box_popen(
        [binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)], text=True
    )
    topo.wait_tcp(topo.box, "127.0.0.1", PORT_NGINX, proc=proc)
    redirect(topo, UID_NGINX, PORT_NGINX)
    return proc, cert.ca_cert


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk_section(
    topo: Topology,
    work: Path,
    paths: dict[str, tuple[int, Path]],
    mb: int,
    rounds: int,
    proxies: dict[str, int],
) -> dict[str, Any]:
    """A `mb` MB HTTPS download and upload per path, paths interleaved in each round
    (order rotated) so that load on the machine hits every path alike; the median.
    `proxies`: the process of each proxied path, whose CPU per transfer is recorded
    (CPU seconds per GB: what the path costs whatever else loads the machine)."""
    size = mb * 1_000_000
    upload = work / "upload.bin"
    with upload.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
    upload.chmod(0o644)
    for uid, cafile in paths.values():  # warm up: certificates, connections
        curl_transfer(topo, uid, cafile, "download", 1_000_000, upload)
    names = list(paths)
    got: dict[str, dict[str, list[float]]] = {
        d: {n: [] for n in names} for d in ("download", "upload")
    }
    cpu: dict[str, dict[str, list[float]]] = {d: {n: [] for n in proxies} for d in got}
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for direction in ("download", "upload"):
            for name in order:
                uid, cafile = paths[name]
                before = cpu_seconds(proxies[name]) if name in proxies else 0.0
                out = curl_transfer(topo, uid, cafile, direction, size, upload)
                got[direction][name].append(out["mb_s"])
                line = f"bulk {direction} {mb} MB {name:22s} {out['mb_s']:7.1f} MB/s"
                if name in proxies:
                    per_gb = (cpu_seconds(proxies[name]) - before) * 1000 / mb
                    cpu[direction][name].append(per_gb)
                    line += f"  proxy CPU {per_gb:5.2f} s/GB"
                print(line, flush=True)
    summary: dict[str, Any] = {
        "mb": mb,
        "rounds": rounds,
        "mb_s": got,
        "proxy_cpu_s_per_gb": cpu,
        "median": {},
    }
    print(f"\nbulk {mb} MB, median of {rounds} (MB/s and ratios; proxy CPU s/GB):")
    for direction, by_path in got.items():
        med = {n: sorted(v)[len(v) // 2] for n, v in by_path.items()}
        summary["median"][direction] = med
        for n, v in med.items():
            per_gb = sorted(cpu[direction].get(n) or [0.0])[len(cpu[direction].get(n) or [0]) // 2]
            print(
                f"  {direction:8s} {n:22s} {v:7.1f} MB/s  vs mitmproxy "
                f"x{ratio(v, med['mitmproxy']):.2f}  vs direct x{ratio(v, med['direct']):.2f}"
                + (f"  vs nginx x{ratio(v, med['nginx (C)']):.2f}" if "nginx (C)" in med else "")
                + (f"  CPU {per_gb:5.2f} s/GB" if n in proxies else ""),
                flush=True,
            )
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument(
        "--bulk",
        action="store_true",
        help="only the bulk section: a large HTTPS download and upload per path",
    )
    ap.add_argument("--bulk-mb", type=int, default=200, help="bulk transfer size (MB)")
    ap.add_argument("--rounds", type=int, default=3, help="bulk rounds, paths interleaved")
    ap.add_argument(
        "--http1", action="store_true", help="bulk: curl --http1.1 (default: curl's h2 via ALPN)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces, iptables)", file=sys.stderr)
        return 2
    scale = 0.1 if args.quick else 1.0
    if args.http1:
        CURL_EXTRA.append("--http1.1")
    counts = {1: int(3000 * scale), 32: int(12000 * scale)}
    new_conns = int(600 * scale)
    rss_requests = int(100000 * scale)

    cleanup_leftovers()
    work = Path(tempfile.mkdtemp(prefix="sp-bench-", dir="/tmp"))
    work.chmod(0o755)
    source = stage_source(work / "src")
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "runs": []}
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

        redirect(topo, UID_INTERCEPTOR, PORT_INTERCEPTOR)
        redirect(topo, UID_PLAIN, PORT_PLAIN)
        redirect(topo, UID_NOLOG, PORT_NOLOG)
        # numprocs=2 emulated: every 2nd new connection to the second process. The nat
        # table sees only a connection's first packet, so nth counts connections.
        redirect(
            topo,
            UID_SPREAD,
            PORT_SECOND,
            ["-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "1"],
        )
        redirect(topo, UID_SPREAD, PORT_INTERCEPTOR)

        dirs = ("run", "logs", "ca", "confdir", "plainconf", "run2", "confdir2", "ca2")
        for d in (*dirs, "run3", "confdir3", "ca3"):
            (work / d).mkdir(mode=0o755)
            os.chown(work / d, PROXY_UID, PROXY_UID)
        policy = work / "run" / "policy.json"
        write_policy(Policy.build(Mode.ENFORCE, True, bench_rules(1), "bench"), policy)
        py_env = {"PYTHONPATH": source, "SECURE_PROXY_UPSTREAM_CA": str(ca.ca_cert)}

        def start_interceptor(
            port: int, confdir: str, cadir: str, rundir: str, policy: Path = policy
        ) -> tuple[subprocess.Popen[Any], Path]:
            marker = work / rundir / "ready"
            err = work / f"interceptor-{port}.log"
            make_init_ca(work / confdir, work / cadir / "ca.pem")
            with err.open("w") as handle:
                proc = topo.box_popen(
                    [
                        python_bin(),
                        "-m",
                        "runtime.container.interceptor",
                        *("--port", str(port), "--policy", str(policy)),
                        *("--confdir", str(work / confdir)),
                        *("--traffic-log", str(work / "logs" / "traffic.jsonl")),
                        *("--ca-cert", str(work / cadir / "ca.pem")),
                        *("--ready-marker", str(marker)),
                    ],
                    user=PROXY_UID,
                    env=py_env,
                    stdout=subprocess.DEVNULL,
                    stderr=handle,
                )
            wait_file(marker, proc, f"interceptor on {port}")
            return proc, err

        interceptor, interceptor_err = start_interceptor(PORT_INTERCEPTOR, "confdir", "ca", "run")
        rss_idle = rss_kib(interceptor.pid)
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

        def show(label: str, out: dict[str, Any], unit: str = "req/s") -> None:
            print(
                f"{label:44s} {out['rps']:8.0f} {unit}  p50 {out['p50_ms']:7.2f} ms  "
                f"p99 {out['p99_ms']:7.2f} ms  ({out['requests']})",
                flush=True,
            )

        if args.bulk:
            nolog_policy = work / "run3" / "policy.json"
            write_policy(Policy.build(Mode.ENFORCE, False, bench_rules(1), "bench"), nolog_policy)
            nolog, _ = start_interceptor(PORT_NOLOG, "confdir3", "ca3", "run3", nolog_policy)
            paths["interceptor, log off"] = (UID_NOLOG, work / "ca3" / "ca.pem")
            nginx, nginx_ca = start_nginx_proxy(topo, work, ca.ca_cert)
            paths["nginx (C)"] = (UID_NGINX, nginx_ca)
            proxies = {
                "mitmproxy": plain.pid,
                "interceptor": interceptor.pid,
                "interceptor, log off": nolog.pid,
                "nginx (C)": nginx.pid,
            }
            results["bulk"] = bulk_section(topo, work, paths, args.bulk_mb, args.rounds, proxies)
            results["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
            for proc in (nginx, nolog, interceptor, plain, upstream):
                topo.stop(proc)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
            shutil.rmtree(work, ignore_errors=True)
            return 0

        for path in paths:  # warm up: CA generation, cert cache, JIT
            client(path, 4, 200, True)
        rss_warm = rss_kib(interceptor.pid)

        # -- 1. interceptor vs direct vs plain mitmproxy -------------------------------
        table: dict[tuple[str, int], dict[str, Any]] = {}
        for conns in (1, 32):
            for path in paths:
                out = client(path, conns, counts[conns], True)
                table[(path, conns)] = out
                results["runs"].append({"path": path, "connections": conns, **out})
                show(f"keep-alive {path} conns={conns}", out)
        newconn: dict[str, dict[str, Any]] = {}
        for path in paths:
            out = client(path, 8, new_conns, False)
            newconn[path] = out
            results["runs"].append({"path": path, "new_connections": True, **out})
            show(f"new TLS conn {path} (8 parallel)", out, "conn/s")

        # -- 2. modes and the traffic log, swapped in by SIGHUP ---------------------------
        def swap(p: Policy) -> None:
            before = interceptor_err.read_text().count("policy reloaded")
            write_policy(p, policy)
            os.kill(interceptor.pid, signal.SIGHUP)  # setpriv execs: this is the interceptor
            deadline = time.monotonic() + 10
            while interceptor_err.read_text().count("policy reloaded") <= before:
                if time.monotonic() > deadline:
                    raise RuntimeError("the interceptor did not reload its policy")
                time.sleep(0.02)

        variants = {
            "enforce, log off": Policy.build(Mode.ENFORCE, False, bench_rules(1), "bench"),
            "monitor (log on)": Policy.build(Mode.MONITOR, True, bench_rules(1), "bench"),
            "allow-all, log off": Policy.build(Mode.ALLOW_ALL, False, (), "bench"),
            "allow-all, log on": Policy.build(Mode.ALLOW_ALL, True, (), "bench"),
            "enforce, 1,000 rules, log on": Policy.build(
                Mode.ENFORCE, True, bench_rules(1000), "bench"
            ),
        }
        modes: dict[str, dict[int, dict[str, Any]]] = {
            "enforce, log on": {c: table[("interceptor", c)] for c in (1, 32)}
        }
        for label, variant in variants.items():
            swap(variant)
            client("interceptor", 4, 100, True)  # settle
            modes[label] = {}
            for conns in (1, 32):
                out = client("interceptor", conns, counts[conns], True)
                modes[label][conns] = out
                results["runs"].append(
                    {"path": "interceptor", "variant": label, "connections": conns, **out}
                )
                show(f"keep-alive {label} conns={conns}", out)
        swap(Policy.build(Mode.ENFORCE, True, bench_rules(1), "bench"))
        results["modes"] = {k: {str(c): v for c, v in d.items()} for k, d in modes.items()}

        # -- 3. two interceptor processes, the REDIRECT spread over them -----------------
        second, _ = start_interceptor(PORT_SECOND, "confdir2", "ca2", "run2")
        # Both processes must present certificates the client trusts: one bundle of both CAs.
        both = work / "ca-both.pem"
        both.write_bytes(
            (work / "ca" / "ca.pem").read_bytes() + (work / "ca2" / "ca.pem").read_bytes()
        )
        both.chmod(0o644)
        paths["spread"] = (UID_SPREAD, both)
        client("spread", 4, 200, True)
        scaling: dict[str, dict[str, Any]] = {}
        for label, path in (("1 process", "interceptor"), ("2 processes", "spread")):
            out = client(path, 32, counts[32], True)
            scaling[f"{label}, keep-alive 32 conns"] = out
            show(f"keep-alive {label} conns=32", out)
            out = client(path, 8, new_conns, False)
            scaling[f"{label}, new TLS conn (8 parallel)"] = out
            show(f"new TLS conn {label} (8 parallel)", out, "conn/s")
        results["scaling"] = scaling
        topo.stop(second)

        # -- 4. RSS over many requests ---------------------------------------------------
        before = rss_kib(interceptor.pid)
        t0 = time.monotonic()
        out = client("interceptor", 32, rss_requests, True, deadline=600)
        after = rss_kib(interceptor.pid)
        log_lines = sum(1 for _ in (work / "logs" / "traffic.jsonl").open())
        results["rss"] = {
            "requests": out["requests"],
            "idle_kib": rss_idle,
            "warm_kib": rss_warm,
            "before_kib": before,
            "after_kib": after,
            "seconds": round(time.monotonic() - t0, 1),
            "log_lines_total": log_lines,
        }
        print(
            f"interceptor RSS: idle {rss_idle / 1024:.1f} MiB, warm {rss_warm / 1024:.1f} MiB, "
            f"{before / 1024:.1f} MiB before and {after / 1024:.1f} MiB after "
            f"{out['requests']} requests (+{(after - before) / 1024:.1f} MiB); "
            f"{log_lines} log lines in total",
            flush=True,
        )

        # -- ratios ------------------------------------------------------------------------
        print("\nratios (interceptor / other):")
        ratios: dict[str, dict[str, float]] = {}
        for conns in (1, 32):
            ic = table[("interceptor", conns)]
            for other in ("direct", "mitmproxy"):
                o = table[(other, conns)]
                key = f"conns={conns} vs {other}"
                ratios[key] = {
                    "rps": ratio(ic["rps"], o["rps"]),
                    "p50": ratio(ic["p50_ms"], o["p50_ms"]),
                    "p99": ratio(ic["p99_ms"], o["p99_ms"]),
                }
        for other in ("direct", "mitmproxy"):
            ratios[f"new TLS conn/s vs {other}"] = {
                "rps": ratio(newconn["interceptor"]["rps"], newconn[other]["rps"])
            }
        for label, by_conns in modes.items():
            for conns, out in by_conns.items():
                for other in ("direct", "mitmproxy"):
                    o = table[(other, conns)]
                    ratios[f"{label}, conns={conns} vs {other}"] = {
                        "rps": ratio(out["rps"], o["rps"]),
                        "p50": ratio(out["p50_ms"], o["p50_ms"]),
                        "p99": ratio(out["p99_ms"], o["p99_ms"]),
                    }
        for kind in ("keep-alive 32 conns", "new TLS conn (8 parallel)"):
            two, one = scaling[f"2 processes, {kind}"], scaling[f"1 process, {kind}"]
            ratios[f"2 processes vs 1, {kind}"] = {
                "rps": ratio(two["rps"], one["rps"]),
                "p50": ratio(two["p50_ms"], one["p50_ms"]),
                "p99": ratio(two["p99_ms"], one["p99_ms"]),
            }
        for key, r in ratios.items():
            print(f"  {key:52s} " + "  ".join(f"{k} x{v:.2f}" for k, v in r.items()))
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
