"""Start-up overhead of the inactive state (a script, not a test).

    /opt/sp-venv/bin/python bench/inactive_bench.py [--runs N] [--json out.json]

Run as root. With no config the init starts no firewall, proxy, CA or supervisord:
what is left is its own work (Python start, config resolution, appuser, setpriv,
the end-of-run scan). Measured inside a sandbox (`copilot_here --engine sandbox`,
no config), where the image's files are: each run creates appuser afresh (as a
new container does) and times, from a process inside the sandbox,

    secure-proxy-init -- /bin/true      vs      /bin/true

The init here is not PID 1 (it becomes a subreaper instead), otherwise it runs as
in a container. Overhead = median(init) - median(bare); goal: under 100 ms.
Bounded: fixed repetitions, every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Topology, cleanup_leftovers  # noqa: E402
from tests.harness.sandbox import Session  # noqa: E402

GOAL_MS = 100.0

# Runs inside the sandbox, as root: one JSON line of wall times in seconds.
TIMER = r"""
import json, subprocess, sys, time
runs = int(sys.argv[1])
init = "/opt/secure-proxy/venv/bin/secure-proxy-init"
env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "HOME": "/root", "PUID": "1000", "PGID": "1000"}
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
def fresh_user():
    subprocess.run(["userdel", "-f", "appuser"], **quiet)
    subprocess.run(["groupdel", "appuser"], **quiet)
def timed(argv):
    t = time.perf_counter()
    code = subprocess.run(argv, env=env, **quiet).returncode
    assert code == 0, (argv, code)
    return time.perf_counter() - t
timed([init, "--", "/bin/true"])  # warm the page cache, as a second container start is
out = {"init": [], "bare": []}
for _ in range(runs):
    fresh_user()
    out["init"].append(timed([init, "--", "/bin/true"]))
    out["bare"].append(timed(["/bin/true"]))
print(json.dumps(out), flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (namespaces)", file=sys.stderr)
        return 2
    cleanup_leftovers()
    project = Path(tempfile.mkdtemp(prefix="sp-inbench-", dir="/tmp"))
    project.chmod(0o755)
    try:
        with Topology() as topo:
            # The uplink is a namespace of ours: nothing of the host's network changes.
            uplink = SimpleNamespace(topo=topo, add_hosts=dict, env=dict)
            command = ["--", "sh", "-c", "echo UP; sleep 600"]
            with Session(project, command, uplink) as s:  # type: ignore[arg-type]
                s.wait_for(lambda line: line == "UP", timeout=60)
                r = s.root([sys.executable, "-c", TIMER, str(args.runs)], timeout=600)
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            return 1
        times = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(project, ignore_errors=True)
    init_ms = statistics.median(times["init"]) * 1000
    bare_ms = statistics.median(times["bare"]) * 1000
    p90 = sorted(times["init"])[int(len(times["init"]) * 0.9) - 1] * 1000
    overhead = init_ms - bare_ms
    print(f"inactive start-up over {args.runs} runs (fresh appuser each):")
    print(f"  secure-proxy-init -- /bin/true  median {init_ms:6.1f} ms  p90 {p90:6.1f} ms")
    print(f"  /bin/true                       median {bare_ms:6.1f} ms")
    verdict = "under" if overhead < GOAL_MS else "OVER"
    print(f"  overhead {overhead:.1f} ms ({verdict} the {GOAL_MS:.0f} ms goal)")
    if args.json:
        args.json.write_text(json.dumps({**times, "overhead_ms": overhead}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
