"""Real work through the guard: `npm ci` and `pip install` from static registries over HTTPS
in the test internet, each mode side by side with the same run's direct baseline.

    /opt/sp-venv/bin/python bench/realwork_bench.py [--quick] [--rounds N] [--json out.json]

Registries (tests/harness/registry.py, deterministic, no real names): an npm project
of 200 packages (lockfileVersion 3, sha512 integrity, tarballs of 2 KB to ~1 MB, ~12 MB)
on https://npm.registry.test, and 20 wheels with dependencies between them behind a
PEP 503 index on https://py.registry.test. Both are static files of
tests.harness.upstream (Python, one thread a connection, keep-alive) on the net host.

Every run is one `copilot_here --engine sandbox` with the test internet:
  direct   no config: inactive, network untouched, nothing logged (the baseline)
  enforce  enforce, only the two registry hosts allowed, traffic log on
  monitor  monitor, the same rules, traffic log on
The modes are interleaved (the order rotates each round). Inside the sandbox the
script times `npm ci` (fresh empty cache, no node_modules: every tarball is fetched)
and `pip install --no-cache-dir` into a venv made before the clock starts; "total"
is the CLI's wall time on the host (sandbox start-up, both commands, exit). Figures
are medians over the rounds; ratios are against direct's median of the same run, and
"per round" is the median of each round's own ratio (load drifts between rounds).
The upstream records every connection and request, so the table also says how many
TLS connections each client opened, and the traffic log is counted in the guarded
modes (every fetch must be in it). CPU seconds (user + system) per command: the
client's (/usr/bin/time), the guard's (every process of proxy-user inside the
sandbox: interceptor, DNS guard) and, per run, the upstream server's: on a machine
whose cores are all busy, the wall-time overhead follows the guard's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import Topology, cleanup_leftovers, stage_source  # noqa: E402
from tests.harness.registry import build_npm, build_pypi, start_static_internet  # noqa: E402
from tests.harness.sandbox import enforce, run_cli, sh, write_config  # noqa: E402
from tests.harness.upstream import read_records  # noqa: E402

NPM_HOST = "npm.registry.test"
PY_HOST = "py.registry.test"
MODES = ("direct", "enforce", "monitor")
APP_UID = 1000  # the sandbox's appuser when the CLI runs as root

#: CPU seconds (user + system) used so far by the guard's processes (proxy-user's:
#: the interceptor, the DNS guard); 0 when there is no such user (direct).
GUARD_CPU = """
import os, pwd
try:
    uid = pwd.getpwnam("proxy-user").pw_uid
except KeyError:
    uid = None
ticks = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if uid is None or os.stat(f"/proc/{pid}").st_uid != uid:
            continue
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    except OSError:
        pass
print(ticks / os.sysconf("SC_CLK_TCK"))
"""

SCRIPT = r"""
cd /work
# The guard's bundle (the system roots plus its CA); direct, the system roots plus the
# test CA: a trust store of the same size, which the client parses per connection.
CA=${{SSL_CERT_FILE:-}}
if [ -z "$CA" ]; then
  CA=$(mktemp); cat /etc/ssl/certs/ca-certificates.crt /ca/upstream-ca.pem >"$CA"
fi
(
  C=$(mktemp -d)
  g0=$(/usr/bin/python3 -c "$GUARD_CPU")
  t0=$(date +%s%N)
  /usr/bin/time -f '%U %S' -o /tmp/npm.time \
    npm ci --cafile "$CA" --cache "$C" --no-audit --no-fund --loglevel=warn >/tmp/npm.out 2>&1
  rc=$?
  t1=$(date +%s%N)
  g1=$(/usr/bin/python3 -c "$GUARD_CPU")
  echo "NPM $rc $(( (t1 - t0) / 1000 )) $(ls node_modules 2>/dev/null | wc -l)" \
    "$(tail -1 /tmp/npm.time) $g0 $g1"
  [ "$rc" = 0 ] || sed 's/^/NPMERR /' /tmp/npm.out | tail -20
)
(
  V=$(mktemp -d)/venv
  /usr/bin/python3 -m venv "$V" || echo "PIPERR venv"
  g0=$(/usr/bin/python3 -c "$GUARD_CPU")
  t0=$(date +%s%N)
  /usr/bin/time -f '%U %S' -o /tmp/pip.time \
    "$V/bin/pip" install -q --no-cache-dir --disable-pip-version-check --cert "$CA" \
    --index-url https://{py_host}/simple/ {requirements} >/tmp/pip.out 2>&1
  rc=$?
  t1=$(date +%s%N)
  g1=$(/usr/bin/python3 -c "$GUARD_CPU")
  echo "PIP $rc $(( (t1 - t0) / 1000 )) $("$V/bin/pip" list 2>/dev/null | grep -c '^spw-')" \
    "$(tail -1 /tmp/pip.time) $g0 $g1"
  [ "$rc" = 0 ] || sed 's/^/PIPERR /' /tmp/pip.out | tail -20
)
echo END
"""


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def version(argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else "?"

    import mitmproxy.version

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "node": version(["node", "--version"]),
        "npm": version(["npm", "--version"]),
        "pip": version(["/usr/bin/python3", "-m", "pip", "--version"]).split(" from ")[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def config(mode: str) -> dict[str, Any] | None:
    if mode == "direct":
        return None
    data = enforce(NPM_HOST, PY_HOST)
    data["mode"] = mode
    return data


def chown_tree(path: Path) -> None:
    for p in (path, *path.rglob("*")):
        os.lchown(p, APP_UID, APP_UID)


class Bench:
    def __init__(self, work: Path, topo: Topology, packages: int, wheels: int) -> None:
        self.work = work
        self.topo = topo
        self.source = stage_source(work / "src")
        root = work / "www"
        t = time.monotonic()
        self.npm = build_npm(root, NPM_HOST, count=packages)
        self.py = build_pypi(root, PY_HOST, count=wheels)
        print(
            f"registries: {packages} npm tarballs ({self.npm.total_bytes / 1e6:.1f} MB), "
            f"{wheels} wheels ({self.py.total_bytes / 1e6:.2f} MB), "
            f"built in {time.monotonic() - t:.1f} s",
            flush=True,
        )
        self.record = work / "upstream.jsonl"
        self.internet = start_static_internet(
            topo, work, self.source, root, [NPM_HOST, PY_HOST], record=self.record
        )
        self.script = f"GUARD_CPU={shlex.quote(GUARD_CPU)}\n" + SCRIPT.format(
            py_host=PY_HOST, requirements=" ".join(self.py.requirements)
        )
        self.projects: dict[str, Path] = {}
        for mode in MODES:
            project = work / f"project-{mode}"
            shutil.copytree(self.npm.project, project)
            cfg = config(mode)
            if cfg:
                write_config(project, cfg, state=str(work / "state"))
            chown_tree(project)
            self.projects[mode] = project
        self.home = work / "home"
        self.home.mkdir(mode=0o777)

    def upstream_cpu(self) -> float:
        """CPU seconds the test internet's server has used (all its threads)."""
        fields = Path(f"/proc/{self.internet.proc.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def run(self, mode: str) -> dict[str, Any]:
        project = self.projects[mode]
        shutil.rmtree(project / "node_modules", ignore_errors=True)
        logs = self.work / f"logs-{mode}-{time.monotonic_ns()}"
        before = len(read_records(self.record))
        env = {"HOME": str(self.home), "XDG_STATE_HOME": str(self.work / "state")}
        args = ["--logs-dir", str(logs), "--", *sh(self.script)]
        up0 = self.upstream_cpu()
        t = time.monotonic()
        r = run_cli(project, args, self.internet, timeout=900, env=env)
        total = time.monotonic() - t
        upstream = self.upstream_cpu() - up0
        lines = r.stdout.splitlines()
        if r.returncode != 0 or "END" not in lines:
            raise RuntimeError(f"{mode}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        out: dict[str, Any] = {"mode": mode, "total_s": total, "upstream_cpu_s": upstream}
        for tool in ("NPM", "PIP"):
            fields = next(x for x in lines if x.startswith(tool + " ")).split()
            if fields[1] != "0":
                errors = [x for x in lines if x.startswith(tool + "ERR")]
                raise RuntimeError(f"{mode}: {tool.lower()} failed:\n" + "\n".join(errors))
            key = tool.lower()
            out[key + "_s"] = int(fields[2]) / 1e6
            out[key + "_installed"] = int(fields[3])
            out[key + "_client_cpu_s"] = float(fields[4]) + float(fields[5])
            out[key + "_guard_cpu_s"] = float(fields[7]) - float(fields[6])
        records = read_records(self.record)[before:]
        for host in (NPM_HOST, PY_HOST):
            reqs = [x for x in records if x.get("ev") == "request" and x.get("host") == host]
            conns = [x for x in records if x.get("ev") == "data" and x.get("sni") == host]
            key = "npm" if host == NPM_HOST else "pip"
            out[key + "_requests"] = len(reqs)
            out[key + "_connections"] = len(conns)
        logged = list(logs.rglob("traffic.jsonl"))
        if mode != "direct":
            entries = [json.loads(x) for p in logged for x in p.read_text().splitlines() if x]
            http = [e for e in entries if e.get("kind") == "http"]
            out["logged_npm"] = sum(1 for e in http if e.get("host") == NPM_HOST)
            out["logged_pip"] = sum(1 for e in http if e.get("host") == PY_HOST)
        shutil.rmtree(logs, ignore_errors=True)
        return out


CPU_KEYS = (
    "npm_client_cpu_s",
    "npm_guard_cpu_s",
    "pip_client_cpu_s",
    "pip_guard_cpu_s",
    "upstream_cpu_s",
)
COUNT_KEYS = ("npm_connections", "pip_connections", "npm_requests", "pip_requests")


def summarize(runs: list[dict[str, Any]], modes: tuple[str, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in ("npm_s", "pip_s", "total_s"):
        base = statistics.median(r[key] for r in runs if r["mode"] == "direct")
        row: dict[str, Any] = {}
        for mode in modes:
            values = [r[key] for r in runs if r["mode"] == mode]
            med = statistics.median(values)
            row[mode] = {"median": med, "min": min(values), "max": max(values), "ratio": med / base}
            # The same ratio taken within each round (the load drifts between rounds).
            by_round = {r["round"]: r[key] for r in runs if r["mode"] == mode}
            direct = {r["round"]: r[key] for r in runs if r["mode"] == "direct"}
            row[mode]["paired"] = statistics.median(v / direct[k] for k, v in by_round.items())
        summary[key] = row
    for key in CPU_KEYS + COUNT_KEYS:
        summary[key] = {
            mode: statistics.median(r[key] for r in runs if r["mode"] == mode) for mode in modes
        }
    return summary


def print_table(summary: dict[str, Any], modes: tuple[str, ...]) -> None:
    head = "| command | " + " | ".join(f"{m} s (min-max)" for m in modes)
    head += " | " + " | ".join(f"{m} vs direct" for m in modes if m != "direct")
    head += " | " + " | ".join(f"{m} vs direct, per round" for m in modes if m != "direct")
    print(head + " |")
    print("|---|" + "---:|" * (len(modes) * 3 - 2))
    names = {"npm_s": "npm ci", "pip_s": "pip install", "total_s": "sandbox run (total)"}
    for key, name in names.items():
        row = summary[key]
        cells = [f"{row[m]['median']:.2f} ({row[m]['min']:.2f}-{row[m]['max']:.2f})" for m in modes]
        ratios = [f"x{row[m]['ratio']:.2f}" for m in modes if m != "direct"]
        ratios += [f"x{row[m]['paired']:.2f}" for m in modes if m != "direct"]
        print(f"| {name} | " + " | ".join(cells + ratios) + " |")
    for key in CPU_KEYS:
        vals = ", ".join(f"{m} {summary[key][m]:.2f}" for m in modes)
        print(f"{key.replace('_', ' ')} (median): {vals}")
    for key in COUNT_KEYS:
        vals = ", ".join(f"{m} {summary[key][m]:g}" for m in modes)
        print(f"upstream {key.replace('_', ' ')} (median): {vals}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 packages, 10 wheels, 2 rounds")
    ap.add_argument("--rounds", type=int, help="rounds of every mode (default 5, quick 2)")
    ap.add_argument("--no-monitor", action="store_true", help="direct and enforce only")
    ap.add_argument("--json", type=Path, help="write every run and the summary here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("realwork_bench needs root (namespaces, the sandbox engine)", file=sys.stderr)
        return 2
    packages, wheels = (60, 10) if args.quick else (200, 20)
    rounds = args.rounds or (2 if args.quick else 5)
    modes = MODES[:2] if args.no_monitor else MODES
    info = machine()
    print(json.dumps(info), flush=True)
    cleanup_leftovers()
    work = Path(tempfile.mkdtemp(prefix="sp-realwork-", dir="/tmp"))
    os.chmod(work, 0o755)
    runs: list[dict[str, Any]] = []
    try:
        with Topology() as topo:
            bench = Bench(work, topo, packages, wheels)
            try:
                bench.run("direct")  # warm-up (page cache, the venv's pip): not counted
                for rnd in range(rounds):
                    order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
                    for mode in order:
                        load = os.getloadavg()[0]
                        res = bench.run(mode)
                        res["round"], res["load1"] = rnd, load
                        runs.append(res)
                        print(json.dumps(res), flush=True)
            finally:
                topo.stop(bench.internet.proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, modes)
    print()
    print(f"{packages} npm packages, {wheels} wheels, {rounds} rounds, medians")
    print_table(summary, modes)
    if args.json:
        data = {"machine": info, "packages": packages, "wheels": wheels, "rounds": rounds}
        data |= {"runs": runs, "summary": summary}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
