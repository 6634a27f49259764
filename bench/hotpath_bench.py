"""Hot-path micro-benchmarks of our own code (a script, not a test): prints figures.

    /opt/sp-venv/bin/python bench/hotpath_bench.py [--quick] [--profile] [--json out.json]

In-process, no network, no root needed:

- Policy.decide per request with 1 rule and with 1,000 rules (exact host hit,
  wildcard hit, host miss, path miss): the lookups are compiled, so the time
  must stay flat as the rule count grows;
- the addon chain mitmproxy runs for one allowed request (PolicyGate,
  UpstreamPinning, TrafficLogger: requestheaders, responseheaders, response),
  with the traffic log on (a real file) and off, on mitmproxy's own test flows;
  and its parts: decide, HttpRecord, encode_line, the log write;
- start-up imports: `import runtime.container.interceptor` in a fresh interpreter against
  importing the mitmproxy modules it needs.

`--profile` adds a cProfile of the addon chain, sorted by own time.
Figures are microseconds per call, best of several timeit repeats.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mitmproxy import http  # noqa: E402
from mitmproxy.proxy.mode_specs import ProxyMode  # noqa: E402
from mitmproxy.test import tflow  # noqa: E402

from runtime.container.interceptor.gate import PolicyGate  # noqa: E402
from runtime.container.interceptor.logger import TrafficLogger  # noqa: E402
from runtime.container.interceptor.policystore import PolicyStore  # noqa: E402
from runtime.container.interceptor.upstream import UpstreamPinning  # noqa: E402
from runtime.core.policy import Mode, Origin, Policy, Request, make_rule  # noqa: E402
from runtime.core.record import HttpRecord, format_ts  # noqa: E402
from runtime.trafficlog import TrafficLogWriter, encode_line  # noqa: E402

USER = Origin("user", "/work/.copilot_here/network.json")
DIALLED = "198.18.0.1"


def best_us(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Microseconds per call, best of `repeat` runs of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def rules(n: int) -> list[Any]:
    """n rules shaped like real configs: exact hosts, wildcards, path prefixes."""
    out = [make_rule("api.github.com", ["/repos/", "/user"], origin=USER)]
    for i in range(1, n):
        if i % 4 == 0:
            out.append(make_rule(f"*.svc{i}.example.com", origin=USER))
        elif i % 4 == 1:
            out.append(make_rule(f"host{i}.example.org", [f"/v{i}/", "/health"], origin=USER))
        else:
            out.append(make_rule(f"h{i}.corp.internal", ["/api/"], ["GET", "POST"], USER))
    out.append(make_rule("*.githubusercontent.com", origin=USER))
    return out


def requests() -> dict[str, Request]:
    def req(path: str, sni: str, method: str = "GET") -> Request:
        return Request(method, path, "https", 443, sni, sni, DIALLED)

    return {
        "exact host, path allowed": req("/repos/o/r/pulls?page=2", "api.github.com"),
        "wildcard host": req("/o/r/main/README.md", "raw.githubusercontent.com"),
        "host not allowed": req("/x", "evil.test"),
        "path not allowed": req("/admin/users", "api.github.com"),
    }


def bench_decide(quick: bool) -> dict[str, Any]:
    number = 2000 if quick else 10000
    out: dict[str, Any] = {}
    policies = {n: Policy.build(Mode.ENFORCE, True, rules(n), "bench") for n in (1, 1000)}
    for name, request in requests().items():
        row = {}
        for n, policy in policies.items():
            decision = policy.decide(request)
            row[n] = best_us(lambda p=policy, r=request: p.decide(r), number)
            row[f"action_{n}"] = decision.action.value
        row["ratio"] = row[1000] / row[1]
        out[name] = row
        print(
            f"decide  {name:26s} 1 rule {row[1]:6.2f} us   1,000 rules {row[1000]:6.2f} us"
            f"   x{row['ratio']:.2f}",
            flush=True,
        )
    return out


def make_flow(url: str, sni: str) -> http.HTTPFlow:
    """An allowed request with its response, as transparent mode hands it to addons."""
    req = http.Request.make("GET", url)
    req.headers["Host"] = req.host
    req.data.host = DIALLED
    client = tflow.tclient_conn()
    client.sni = sni
    client.proxy_mode = ProxyMode.parse("transparent")
    client.sockname = (DIALLED, 443)
    flow = tflow.tflow(client_conn=client, req=req)
    flow.response = http.Response.make(200, b'{"ok":true}\n', {"content-type": "application/json"})
    return flow


async def resolve(host: str, port: int) -> list[str]:
    """A resolver that answers at once: the benchmark measures our code, not DNS."""
    return [DIALLED]


def drive(hook_result: Any) -> None:
    """Run an async hook that never waits (the resolver above) without an event loop."""
    try:
        hook_result.send(None)
    except StopIteration:
        return
    raise RuntimeError("the hook waited")


def chain(policy: Policy, writer: TrafficLogWriter | None) -> Callable[[http.HTTPFlow], None]:
    gate = PolicyGate(PolicyStore(policy))
    pin = UpstreamPinning(resolve=resolve)
    log = TrafficLogger()
    log.writer = writer

    def one(flow: http.HTTPFlow) -> None:
        response = flow.response
        flow.response = None
        gate.requestheaders(flow)
        drive(pin.requestheaders(flow))
        log.requestheaders(flow)
        flow.response = response
        log.responseheaders(flow)
        log.response(flow)

    return one


def fresh(flows: list[http.HTTPFlow]) -> None:
    for flow in flows:
        flow.metadata.clear()
        flow.request.stream = None
        if flow.response is not None:
            flow.response.stream = None


def bench_chain(quick: bool, logdir: Path) -> dict[str, Any]:
    n = 1000 if quick else 5000
    repeat = 5
    flows = [
        make_flow(f"https://api.github.com/repos/o/r/pulls?page={i}", "api.github.com")
        for i in range(n)
    ]
    out: dict[str, Any] = {}
    variants = {
        "enforce, log on": (Mode.ENFORCE, True),
        "enforce, log off": (Mode.ENFORCE, False),
        "monitor (log forced on)": (Mode.MONITOR, True),
        "allow-all, log off": (Mode.ALLOW_ALL, False),
    }
    for name, (mode, log) in variants.items():
        policy = Policy.build(mode, log, rules(1000), "bench")
        writer = TrafficLogWriter(logdir / "traffic.jsonl")
        one = chain(policy, writer)
        times = []
        for _ in range(repeat):
            fresh(flows)
            t0 = time.perf_counter()
            for flow in flows:
                one(flow)
            times.append(time.perf_counter() - t0)
        writer.close()
        us = min(times) / n * 1e6
        out[name] = us
        print(f"addon chain per request  {name:26s} {us:7.2f} us", flush=True)
    # The parts, for the log-on request.
    policy = Policy.build(Mode.ENFORCE, True, rules(1000), "bench")
    request = requests()["exact host, path allowed"]
    decision = policy.decide(request)
    now = time.time()
    fields = {
        "phase": "end",
        "id": "0f5e4a6c-1d2b-4a8e-9c3f-7b6a5d4c3b2a",
        "action": decision.log_action,
        "violation": False,
        "mode": "enforce",
        "reason": decision.reason.value,
        "rule": "api.github.com",
        "rule_source": USER.label,
        "method": "GET",
        "scheme": "https",
        "host": decision.host,
        "port": 443,
        "path": decision.path,
        "status": 200,
        "http_version": "HTTP/1.1",
        "duration_ms": 1.2345,
        "bytes_out": 0,
        "bytes_in": 12,
    }
    record = HttpRecord(ts=format_ts(now), **fields)
    writer = TrafficLogWriter(logdir / "parts.jsonl")
    number = 2000 if quick else 20000
    parts = {
        "decide": best_us(lambda: policy.decide(request), number),
        "HttpRecord + format_ts": best_us(lambda: HttpRecord(ts=format_ts(now), **fields), number),
        "encode_line": best_us(lambda: encode_line(record), number),
        "writer.write (encode + os.write)": best_us(lambda: writer.write(record), number),
    }
    writer.close()
    for name, us in parts.items():
        print(f"  part  {name:34s} {us:7.2f} us", flush=True)
    out["parts"] = parts
    return out


def profile_chain(logdir: Path, n: int = 20000) -> str:
    policy = Policy.build(Mode.ENFORCE, True, rules(1000), "bench")
    writer = TrafficLogWriter(logdir / "profile.jsonl")
    one = chain(policy, writer)
    flows = [
        make_flow(f"https://api.github.com/repos/o/r/pulls?page={i}", "api.github.com")
        for i in range(n)
    ]
    prof = cProfile.Profile()
    prof.enable()
    for flow in flows:
        one(flow)
    prof.disable()
    writer.close()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("tottime")
    stats.print_stats(25)
    return buf.getvalue()


def bench_imports(quick: bool) -> dict[str, float]:
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stmts = {
        "python -c pass": "pass",
        "mitmproxy modules the interceptor needs": (
            "import mitmproxy.http, mitmproxy.ctx, mitmproxy.proxy.mode_specs, "
            "mitmproxy.tools.dump, loguru"
        ),
        "import runtime.container.interceptor + DumpMaster": (
            "import runtime.container.interceptor, mitmproxy.tools.dump"
        ),
    }
    out = {}
    for name, stmt in stmts.items():
        runs = []
        for _ in range(3 if quick else 7):
            t0 = time.perf_counter()
            subprocess.run([python, "-c", stmt], env=env, check=True)
            runs.append(time.perf_counter() - t0)
        out[name] = min(runs) * 1000
        print(f"start-up  {name:42s} {out[name]:7.1f} ms", flush=True)
    return out


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the addon chain")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="sp-hot-") as tmp:
        logdir = Path(tmp)
        results["decide"] = bench_decide(args.quick)
        results["chain"] = bench_chain(args.quick, logdir)
        results["imports_ms"] = bench_imports(args.quick)
        if args.profile:
            text = profile_chain(logdir)
            print(text)
            results["profile"] = text
    print("machine:", json.dumps(results["machine"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
