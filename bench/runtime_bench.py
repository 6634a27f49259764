"""Runtime benchmark (a script, not a test): start-up phases and reload latency.

    /opt/sp-venv/bin/python bench/runtime_bench.py [--quick] [--workers-only | --startup-only]
        [--starts N] [--json out.json]

Run as root. Drives `copilot_here --engine sandbox` (the same init, supervisord,
firewall and interceptor as the image) against the e2e test internet:

- start-up: from the init's exec to the user command's first instruction, per
  phase. The init's own stage trace (SECURE_PROXY_TRACE=1, stderr, stamped here
  on arrival), the sandbox's "runtime installed" line (printed just before it
  execs the init) and the mtimes of the markers the components write (policy.json,
  firewall.verified, interceptor.ready, ca.pem, read by the command itself) give:
  config, supervisord start, firewall verified, interceptor ready, CA trust,
  command launch. The command's first instruction is `date +%s.%N`. Baseline:
  the same namespaces (unshare) running the same command with no runtime.
  Enforce config, and rules disabled with a log (no config is inactive: no
  services; its start-up is bench/inactive_bench.py's).
- reload latency: with --network-config-write, a keep-alive client inside the
  sandbox requests an URL every 5 ms; the config is rewritten to allow or block
  it; latency = config write to the first request judged by the new policy.
  Split at the interceptor's "policy reloaded" log line. Baseline: restarting
  the container (the start-up above), which is what a user would do without it.

- workers, 1 vs 2 (first; `--workers-only` runs it alone): the config's "workers"
  through the same real runtime, against a Node HTTPS upstream on the net host; the
  load is interceptor_bench.py's Node client run by the agent inside the sandbox:
  32 keep-alive connections, then new TLS connections 8 at a time. Runs interleaved
  (1, 2, 1, 2, ...), ratio per pair; each worker's CPU share during each load
  (/proc/<pid>/stat) shows how the work divided and how busy the processes were.

Bounded: fixed repetitions, every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from interceptor_bench import CLIENT_JS, NAME, UPSTREAM_JS  # noqa: E402

from tests.harness import Topology, cleanup_leftovers, python_bin, stage_source  # noqa: E402
from tests.harness.sandbox import (  # noqa: E402
    Internet,
    Session,
    cli_argv,
    cli_env,
    enforce,
    write_config,
)
from tests.harness.upstream import UpstreamCA  # noqa: E402

MARKERS = (
    "/run/secure-proxy/policy.json",
    "/run/secure-proxy/firewall.verified",
    "/run/secure-proxy/interceptor/interceptor.ready",
    "/ca/certs/ca.pem",
)
# The command: its first instruction prints the time, then it reports the markers.
FIRST = "date +%s.%N; stat -c 'M %n %.9Y' " + " ".join(MARKERS)

RELOAD_CLIENT = r"""
import http.client, ssl, sys, time
host, path, period, total = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
ctx = ssl.create_default_context()
conn = None
last = None
end = time.monotonic() + total
while time.monotonic() < end:
    t = time.time()
    try:
        if conn is None:
            conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=2)
        conn.request("GET", path)
        r = conn.getresponse(); r.read()
        status = r.status
        if r.getheader("connection", "").lower() == "close":
            conn.close(); conn = None
    except Exception as e:
        status = 0
        if conn is not None:
            conn.close()
        conn = None
    if status != last:
        print(f"STATUS {t:.6f} {status}", flush=True)
        last = status
    time.sleep(period)
"""


def start_once(project: Path, internet: Internet) -> dict[str, float]:
    """One sandbox start; every event as an absolute time.time()."""
    argv = cli_argv(["--", "sh", "-c", FIRST], internet.topo.net, internet.add_hosts())
    env = cli_env({**internet.env(), "SECURE_PROXY_TRACE": "1"})
    events: dict[str, float] = {}
    t_launch = time.time()
    proc = subprocess.Popen(
        argv,
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def pump_err() -> None:
        assert proc.stderr
        for line in proc.stderr:
            now = time.time()
            if line.startswith("[sandbox]") and "root built" in line:
                events["init exec"] = now
            m = re.match(r"\[init \+[\d.]+s\] (.*)", line.strip())
            if m:
                events.setdefault(m.group(1), now)

    reader = threading.Thread(target=pump_err, daemon=True)
    reader.start()
    assert proc.stdout
    out = proc.stdout.read()  # the command's output; ends when the sandbox does
    proc.wait(timeout=90)
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"sandbox exited {proc.returncode}: {out}")
    lines = out.splitlines()
    events["first instruction"] = float(lines[0])
    for line in lines[1:]:
        if line.startswith("M "):
            _, name, mtime = line.split()
            events[name] = float(mtime)
    events["launch"] = t_launch
    return events


def phases(ev: dict[str, float]) -> dict[str, float]:
    """Seconds per phase, from the init's exec."""
    t0 = ev["init exec"]
    sup = ev["supervisord started"]
    ready = next(v for k, v in ev.items() if k.startswith("ready at level"))
    return {
        "sandbox setup before init (netns, root, install)": t0 - ev["launch"],
        # supervisord starts as soon as the config is read; the init then prepares
        # what its programs read (the CA, policy.json, the session) while they import,
        # and they wait for its `prepared` marker (runtime.container.launch).
        "python start + config resolved (supervisord started)": sup - t0,
        "CA made (from supervisord start)": ev["CA made"] - sup,
        "services prepared: CA, policy.json, session, logs (from supervisord start)": ev[
            "services prepared"
        ]
        - sup,
        "firewall verified (from supervisord start)": ev["/run/secure-proxy/firewall.verified"]
        - sup,
        "interceptor ready (from supervisord start)": ev[
            "/run/secure-proxy/interceptor/interceptor.ready"
        ]
        - sup,
        # The CA is trusted while the firewall and the interceptor start: these overlap.
        "CA trust (system bundle written, env; from supervisord start)": ev["CA trusted"] - sup,
        "init saw every marker": ready - t0,
        "command launch (setpriv, exec)": ev["first instruction"] - ready,
        "total: init exec to first instruction": ev["first instruction"] - t0,
        # Not start-up: how long the init takes to stop the services once the command
        # has exited (each run's exit waits for it).
        "stop: command exited to supervisord stopped": ev["supervisord stopped"]
        - ev["command exited (0)"],
    }


def baseline_once() -> float:
    """Same namespaces, no runtime: unshare + the command's first instruction."""
    t = time.time()
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--pid",
            "--uts",
            "--ipc",
            "--fork",
            "--",
            "sh",
            "-c",
            "date +%s.%N",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return float(out.split()[0]) - t


LOGURU_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})")


def reload_runs(project: Path, internet: Internet, count: int) -> list[dict[str, float]]:
    path = write_config(project, enforce("api.github.com"))
    client = [python_bin(), "-c", RELOAD_CLIENT, "example.com", "/reload", "0.005", "300"]
    results: list[dict[str, float]] = []
    with Session(project, ["--network-config-write", "--", *client], internet) as s:
        first = s.wait_for(lambda ln: ln.startswith("STATUS"), timeout=60)
        assert first.split()[2] == "403", first
        allowed = False
        for _ in range(count):
            time.sleep(0.5)
            allowed = not allowed
            hosts = ("api.github.com", "example.com") if allowed else ("api.github.com",)
            want = "200" if allowed else "403"
            t0 = time.time()
            with open(path, "w") as handle:  # in place, as an editor without backup
                handle.write(json.dumps(enforce(*hosts)))
            line = s.wait_for(lambda ln, w=want: ln.startswith("STATUS") and ln.endswith(w), 10)
            results.append({"write": t0, "judged": float(line.split()[1])})
        shared = s.root(["cat", "/var/log/secure-proxy/interceptor.log"]).stdout.splitlines()
        # The workers share one log, each line naming its worker.
        logs = ["\n".join(ln for ln in shared if f"| worker {n} |" in ln) for n in range(8)]
    # Per worker, its reload times; an edit counts as reloaded once every worker has it.
    reloaded = [
        [
            datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            for line in log.splitlines()
            if "policy reloaded" in line and (m := LOGURU_TS.match(line))
        ]
        for log in logs
        if log
    ]
    for r in results:
        firsts = [min((t for t in ts if t >= r["write"] - 0.002), default=None) for ts in reloaded]
        r["reloaded"] = max(firsts) if firsts and None not in firsts else float("nan")
    return results


# ------------------------------------------------------------------- workers: 1 vs 2


def workers_once(project: Path, internet: Internet, workers: int, quick: bool) -> dict[str, Any]:
    """One sandbox with `workers` interceptor processes; inside it, as the agent, the
    Node load generator of interceptor_bench.py: 32 keep-alive connections, then new
    TLS connections (8 at a time, no session reuse), against the Node upstream."""
    config = {**enforce(NAME), "workers": workers}
    write_config(project, config)
    (project / "client.js").write_text(CLIENT_JS)
    url = f"https://{NAME}/api/x"
    ka_total, new_total = (1500, 300) if quick else (4000, 800)
    # Each worker's CPU time (utime + stime, in ticks) around each load: how busy the
    # processes were, so how the work divided between them.
    cpu = (
        "cpu() { for p in $(pgrep -u proxy-user '^interceptor-'); do "
        'echo "CPU $1 $p $(cut -d" " -f14,15 /proc/$p/stat)"; done; }'
    )
    script = "; ".join(
        [
            cpu,
            "cpu ka0",
            f"node /work/client.js {url} 32 {ka_total} /ca/certs/ca.pem 1 120",
            "cpu ka1",
            f"node /work/client.js {url} 8 {new_total} /ca/certs/ca.pem 0 120",
            "cpu new1",
        ]
    )
    argv = cli_argv(["--", "sh", "-c", script], internet.topo.net, internet.add_hosts())
    env = cli_env({**internet.env(), "SECURE_PROXY_TRACE": "1"})
    load = os.getloadavg()[0]  # the machine is shared: what else ran shows here
    r = subprocess.run(
        argv, cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"sandbox exited {r.returncode}: {r.stdout}\n{r.stderr[-2000:]}")
    ka, new = (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))
    ticks: dict[str, dict[str, int]] = {}
    for line in r.stdout.splitlines():
        if line.startswith("CPU "):
            _, mark, pid, utime, stime = line.split()
            ticks.setdefault(mark, {})[pid] = int(utime) + int(stime)
    hz = os.sysconf("SC_CLK_TCK")

    def busy(a: str, b: str, seconds: float) -> list[float]:
        """Per worker, the share of one core it used between two marks."""
        return sorted(
            ((ticks[b][p] - ticks[a].get(p, 0)) / hz / seconds for p in ticks.get(b, {})),
            reverse=True,
        )

    ready = re.search(r"\[init \+([\d.]+)s\] ready at level", r.stderr)
    for res in (ka, new):
        if res["errors"] or set(res["statuses"]) != {"200"}:
            raise RuntimeError(f"requests failed: {res}")
    return {
        "load average before": load,
        "keep-alive req/s": ka["rps"],
        "keep-alive p50 ms": ka["p50_ms"],
        "keep-alive p99 ms": ka["p99_ms"],
        "new TLS conn/s": new["rps"],
        "init ready s": float(ready.group(1)) if ready else float("nan"),
        "keep-alive: cores busy per worker": busy("ka0", "ka1", ka["seconds"]),
        "new TLS: cores busy per worker": busy("ka1", "new1", new["seconds"]),
    }


def workers_section(work: Path, topo: Topology, source: str, quick: bool) -> dict[str, Any]:
    """1 vs 2 workers through the real runtime, runs interleaved (1, 2, 1, 2, ...): the
    ratio is taken per pair (a 1-worker run and the 2-worker run right after it) and
    its median reported, so load that comes and goes on a shared machine cancels out
    better than in a ratio of medians."""
    ca = UpstreamCA.create(work / "wca", names=[NAME])
    ca.server_key.chmod(0o644)
    (work / "upstream.js").write_text(UPSTREAM_JS)
    node = topo.net_popen(
        ["node", str(work / "upstream.js"), str(ca.server_cert), str(ca.server_key)], text=True
    )
    assert node.stdout is not None
    if node.stdout.readline().strip() != "READY":
        raise RuntimeError("the Node upstream did not start")
    internet = Internet(topo, ca, node, hosts=(NAME,))
    rounds = 1 if quick else 5
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    try:
        for n in range(rounds):
            for workers in (1, 2):
                project = work / f"proj-workers-{workers}-{n}"
                project.mkdir(mode=0o755)
                res = workers_once(project, internet, workers, quick)
                runs[workers].append(res)
                print(f"  workers {workers}, round {n + 1}: {json.dumps(res)}", flush=True)
    finally:
        topo.stop(node)
    per_worker = [k for k in runs[1][0] if "per worker" in k]
    busy = {w: {k: [r[k] for r in rs] for k in per_worker} for w, rs in runs.items()}
    for rs in runs.values():
        for r in rs:
            for k in per_worker:
                r[k + " (sum)"] = sum(r.pop(k))
    med = {w: {k: median([r[k] for r in rs]) for k in rs[0]} for w, rs in runs.items()}
    pairs = {k: [b[k] / a[k] for a, b in zip(runs[1], runs[2], strict=True)] for k in med[1]}
    ratio = {k: median(v) for k, v in pairs.items()}
    print(f"workers (median of {rounds}):   1 worker   2 workers   2 vs 1 (median of pairs; pairs)")
    for k in med[1]:
        each = " ".join(f"{x:.2f}" for x in pairs[k])
        print(f"  {k:22s} {med[1][k]:10.2f} {med[2][k]:10.2f}   x{ratio[k]:.2f} ({each})")
    for w in (1, 2):
        for k in per_worker:
            shares = "; ".join(" + ".join(f"{x:.2f}" for x in run) for run in busy[w][k])
            print(f"  workers {w}, {k}: {shares}")
    return {
        "runs": runs,
        "busy": busy,
        "median": med,
        "2 vs 1 per pair": pairs,
        "2 vs 1": ratio,
    }


def cpu_probe() -> float:
    """Seconds one core takes for a fixed piece of pure Python: this shared VM's speed
    moves by a third from hour to hour, so runs at different moments compare by it."""
    t = time.perf_counter()
    sum(range(30_000_000))
    return time.perf_counter() - t


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workers-only", action="store_true", help="only the 1 vs 2 workers section")
    ap.add_argument(
        "--startup-only",
        action="store_true",
        help="only the start-up section (e.g. run alternately from two checkouts to compare)",
    )
    ap.add_argument("--starts", type=int, help="starts per config (default 5, --quick 2)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (namespaces, iptables)", file=sys.stderr)
        return 2
    starts = args.starts or (2 if args.quick else 5)
    reloads = 4 if args.quick else 12
    cleanup_leftovers()
    work = Path(tempfile.mkdtemp(prefix="sp-rtbench-", dir="/tmp"))
    work.chmod(0o755)
    source = stage_source(work / "src")
    out: dict[str, Any] = {"quick": args.quick, "cpu_probe_s": cpu_probe()}
    print(f"CPU probe (sum(range(30M)) on one core): {out['cpu_probe_s']:.3f} s", flush=True)
    with Topology() as topo:
        if not args.startup_only:
            out["workers"] = workers_section(work, topo, source, args.quick)
        if args.workers_only:
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
            shutil.rmtree(work, ignore_errors=True)
            return 0
        internet = Internet.start(topo, work / "net", source)
        # No config is inactive (no services, nothing to time here): inactive_bench.py.
        log_only = {"enabled": False, "log_to_file": True}
        for n, (label, config) in enumerate(
            (("enforce config", enforce("api.github.com")), ("disabled, log (allow-all)", log_only))
        ):
            project = work / f"proj-{n}"
            project.mkdir(mode=0o755)
            write_config(project, config)
            start_once(project, internet)  # warm-up (page cache, the test internet's start)
            runs = [phases(start_once(project, internet)) for _ in range(starts)]
            med = {k: median([r[k] for r in runs]) for k in runs[0]}
            out[f"startup, {label}"] = {"median_s": med, "runs": runs}
            print(f"start-up, {label} (median of {starts}):", flush=True)
            for k, v in med.items():
                print(f"  {k:52s} {v * 1000:8.0f} ms")
        base = median([baseline_once() for _ in range(starts)])
        out["startup baseline (unshare + command, no runtime) s"] = base
        total = out["startup, enforce config"]["median_s"]["total: init exec to first instruction"]
        print(f"start-up baseline, no runtime: {base * 1000:.0f} ms; runtime x{total / base:.0f}")
        if args.startup_only:
            topo.stop(internet.proc)
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
            shutil.rmtree(work, ignore_errors=True)
            return 0

        project = work / "proj-reload"
        project.mkdir(mode=0o755)
        runs = reload_runs(project, internet, reloads)
        lat = [r["judged"] - r["write"] for r in runs]
        to_reload = [r["reloaded"] - r["write"] for r in runs]
        to_judged = [r["judged"] - r["reloaded"] for r in runs]
        out["reload"] = {
            "runs": runs,
            "median_s": median(lat),
            "max_s": max(lat),
            "write_to_interceptor_reloaded_median_s": median(to_reload),
            "reloaded_to_first_judged_median_s": median(to_judged),
            "vs_restart_ratio": median(lat) / total,
        }
        print(
            f"reload: config write -> first request judged by the new policy: median "
            f"{median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms over {len(lat)} edits "
            f"(write -> interceptor reloaded {median(to_reload) * 1000:.0f} ms, then "
            f"{median(to_judged) * 1000:.0f} ms to the next request); vs restarting: "
            f"x{median(lat) / total:.2f}",
            flush=True,
        )
        topo.stop(internet.proc)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
