"""Reloads (SIGHUP) that land while the interceptor's workers start, in
`copilot_here --engine sandbox` with workers 2: a worker forked again after a kill -9,
and the first workers of a restarted pool. A worker killed by a SIGHUP that came
before its handler existed was a crash to its pool: the pool gave up (exit 1) and
supervisord restarted it, outages on top of the fault. Checked on the pool's pid, the
shared log, and the test internet's record: every worker serves the policy in force.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import python_bin
from tests.harness.sandbox import Internet, Session, client_script, enforce, write_config
from tests.harness.upstream import read_records

pytestmark = pytest.mark.e2e

LOG = "/var/log/secure-proxy/interceptor.log"
RELOADER_LOG = "/var/log/secure-proxy/reloader.log"
BOTH = {**enforce("api.github.com", "evil.test"), "workers": 2}
ONE = {**enforce("api.github.com"), "workers": 2}

# The agent: at each /tmp/go<step> (until /tmp/end), 4 new connections each to the
# allowed and to the refused host (the nth rules give each worker half), one JSON line
# each; STEP<step>.
AGENT = r"""
import json, os, socket, ssl, sys, time
ctx = ssl.create_default_context()
def ask(host, path):
    try:
        s = ctx.wrap_socket(socket.create_connection((host, 443), timeout=4),
                            server_hostname=host)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return s.recv(100).split(b"\r\n", 1)[0].decode(errors="replace")
    except Exception as exc:
        return type(exc).__name__
print("UP", flush=True)
step = 0
while True:
    while not os.path.exists(f"/tmp/go{step}") and not os.path.exists("/tmp/end"):
        time.sleep(0.02)
    if not os.path.exists(f"/tmp/go{step}"):
        break
    for i in range(4):
        for host in ("api.github.com", "evil.test"):
            print(json.dumps({"host": host, "out": ask(host, f"/s{step}/{host}/{i}")}),
                  flush=True)
    print(f"STEP{step}", flush=True)
    step += 1
print("END", flush=True)
"""

# SIGHUP to the interceptor's pool every 10 ms for 1.5 s, from when it has forked a
# worker (not SigBlk in /proc: sigwaitinfo unblocks what it waits for while it sleeps).
# argv: the pool's pid, or "start" (supervisorctl start it, find the new pool at once:
# its first workers start within some 50 ms), or "start-importing" (the same, but from
# when its console script has blocked SIGHUP, while it still imports: before that line
# the interpreter's own start dies of one, as any process would). Prints the pool's pid
# and whether the first SIGHUP came before any worker existed.
BURST = r"""
import os, signal, subprocess, sys, time
def pool_pid():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"secure-proxy-interceptor") for a in argv) and b"--workers" in argv:
            return int(pid)
t0 = time.monotonic()
def children(pid):
    return open(f"/proc/{pid}/task/{pid}/children").read().split()
def importing(pid):  # SIGHUP blocked alone: launch.py's line, before the pool's own
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("SigBlk:")[1].split()[0], 16) == 1 << (signal.SIGHUP - 1)
if sys.argv[1].startswith("start"):
    starting = subprocess.Popen(["supervisorctl", "start", "interceptor"],
                                stdout=subprocess.DEVNULL)
    while (pool := pool_pid()) is None:
        if time.monotonic() - t0 > 20:
            sys.exit("no pool started")
        time.sleep(0.001)
else:
    pool = int(sys.argv[1])
while not (importing(pool) if sys.argv[1] == "start-importing" else children(pool)):
    if time.monotonic() - t0 > 20:
        sys.exit(f"pool {pool}: no worker, or never SIGHUP blocked alone")
    time.sleep(0.001)
waited = time.monotonic() - t0
early = not children(pool)
for i in range(150):
    try:
        os.kill(pool, signal.SIGHUP)
    except ProcessLookupError:
        sys.exit(f"pool {pool} gone after {i} SIGHUPs")
    time.sleep(0.01)
print(f"BURST-DONE pool {pool} after {waited:.2f} s, first before any worker: {early}",
      flush=True)
"""


class Run:
    def __init__(self, s: Session, project: Path, internet: Internet) -> None:
        self.s, self.project, self.internet, self.step = s, project, internet, 0

    def pool(self) -> str:
        return self.s.root(["supervisorctl", "pid", "interceptor"]).stdout.strip()

    def log(self) -> str:
        return self.s.root(["cat", LOG]).stdout

    def wait_applied(self) -> None:
        """The reloader has applied ONE (only api.github.com)."""
        deadline = time.monotonic() + 10
        while "mode enforce, 1 rules" not in self.s.root(["cat", RELOADER_LOG]).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def settled(self, pool: str) -> None:
        """The pool `pool` running with both workers ready (their markers)."""
        deadline = time.monotonic() + 20
        markers = ["/run/secure-proxy/interceptor/interceptor.ready"]
        markers.append("/run/secure-proxy/interceptor/interceptor-1.ready")
        while not (
            self.pool() == pool
            and "RUNNING" in self.s.root(["supervisorctl", "status", "interceptor"]).stdout
            and all(self.s.worker_pid(n) for n in (0, 1))
            and self.s.root(["test", "-e", markers[0], "-a", "-e", markers[1]]).returncode == 0
        ):
            assert time.monotonic() < deadline, (pool, self.pool(), self.log()[-3000:])
            time.sleep(0.2)

    def probe(self) -> list[dict]:
        assert self.s.root(["touch", f"/tmp/go{self.step}"]).returncode == 0
        got = []
        end = f"STEP{self.step}"
        while (ln := self.s.wait_for(lambda x: x == end or x.startswith("{"), 60)) != end:
            got.append(json.loads(ln))
        self.step += 1
        return got

    def arrived(self, prefix: str) -> list[str]:
        return [
            r["path"]
            for r in read_records(self.internet.record)
            if r.get("ev") == "request" and r["path"].startswith(prefix)
        ]


@pytest.fixture(scope="module")
def run(internet) -> Iterator[Run]:
    project = Path(tempfile.mkdtemp(prefix="sp-proj-", dir="/tmp"))
    os.chmod(project, 0o755)
    write_config(project, BOTH)
    argv = ["--network-config-write", "--", *client_script(AGENT)]
    try:
        with Session(project, argv, internet) as s:
            s.wait_for(lambda ln: ln == "UP", timeout=60)
            yield Run(s, project, internet)
            assert s.root(["touch", "/tmp/end"]).returncode == 0
            s.wait_for(lambda ln: ln == "END", timeout=30)  # the agent ran to its end
            assert s.wait(timeout=30) == 0
    finally:
        shutil.rmtree(project, ignore_errors=True)


def test_a_reload_during_a_forked_again_workers_start_is_applied_not_a_crash(run: Run):
    """Worker 1 killed with -9 while reloads keep coming (a live edit that takes
    evil.test out, then SIGHUP every 10 ms): the worker forked again takes them once it
    can, the pool does not give up, and both workers refuse evil.test."""
    pool, w1 = run.pool(), run.s.worker_pid(1)
    write_config(run.project, ONE, approve=False)
    assert run.s.root(["kill", "-9", str(w1)]).returncode == 0
    burst = run.s.root([python_bin(), "-c", BURST, pool], timeout=30)
    assert "BURST-DONE" in burst.stdout, burst
    run.settled(pool)  # the same pool: it never gave up
    run.wait_applied()
    log = run.log()
    assert "killed by SIGHUP" not in log and "giving up" not in log, log[-3000:]
    outs = run.probe()
    assert [p["out"] for p in outs if p["host"] == "api.github.com"] == ["HTTP/1.1 200 OK"] * 4
    assert [p["out"] for p in outs if p["host"] == "evil.test"] == ["HTTP/1.1 403 Forbidden"] * 4
    assert run.arrived(f"/s{run.step - 1}/evil.test/") == []
    assert len(run.arrived(f"/s{run.step - 1}/api.github.com/")) == 4


def test_a_reload_during_the_first_workers_start_does_not_fail_the_start(run: Run):
    """The pool started again (supervisorctl) with reloads coming while its first
    workers start: it used to exit 1 ("died while starting"), and supervisord's
    retries met the same reloads; now it starts once and serves the policy in force."""
    write_config(run.project, ONE, approve=False)  # in force already after the test above
    run.wait_applied()
    assert run.s.root(["supervisorctl", "stop", "interceptor"], timeout=30).returncode == 0
    seen = len(run.log())  # this restart's lines only
    burst = run.s.root([python_bin(), "-c", BURST, "start"], timeout=30)
    assert "BURST-DONE" in burst.stdout, burst
    pool = burst.stdout.split()[2]
    run.settled(pool)
    log = run.log()[seen:]
    assert "while starting" not in log and "killed by SIGHUP" not in log, log[-3000:]
    for n in (0, 1):  # the reloads reached both, and were applied
        assert f"| worker {n} | runtime.container.interceptor.policystore:reload" in log, n
    outs = run.probe()
    assert [p["out"] for p in outs if p["host"] == "api.github.com"] == ["HTTP/1.1 200 OK"] * 4
    assert [p["out"] for p in outs if p["host"] == "evil.test"] == ["HTTP/1.1 403 Forbidden"] * 4
    assert run.arrived(f"/s{run.step - 1}/evil.test/") == []


def test_a_reload_while_the_pool_imports_waits_for_it(run: Run):
    """SIGHUP to a pool that is still importing mitmproxy (no worker yet): its console
    script blocked SIGHUP first, so the pool takes it once it runs instead of dying
    of it (a failed start, supervisord's BACKOFF)."""
    write_config(run.project, ONE, approve=False)  # in force already after the tests above
    run.wait_applied()
    assert run.s.root(["supervisorctl", "stop", "interceptor"], timeout=30).returncode == 0
    seen = len(run.log())
    burst = run.s.root([python_bin(), "-c", BURST, "start-importing"], timeout=30)
    assert "BURST-DONE" in burst.stdout, burst
    assert "first before any worker: True" in burst.stdout, burst  # the window was hit
    pool = burst.stdout.split()[2]
    run.settled(pool)
    log = run.log()[seen:]
    assert "while starting" not in log and "killed by SIGHUP" not in log, log[-3000:]
    outs = run.probe()
    assert [p["out"] for p in outs if p["host"] == "api.github.com"] == ["HTTP/1.1 200 OK"] * 4
    assert [p["out"] for p in outs if p["host"] == "evil.test"] == ["HTTP/1.1 403 Forbidden"] * 4
    assert run.arrived(f"/s{run.step - 1}/evil.test/") == []
