"""The traffic log never fails open: a real interceptor whose logs directory fills up, and
one killed with -9 while a request is in flight. What reached the upstream is read from
the upstream's own record, never from the interceptor.

The logs directory is a small tmpfs mounted for this module; the policy logs every
request (enforce, log_to_file), so a request whose start line cannot be written must
be refused (503 log_unavailable) and must not reach the upstream.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.core.policy import Mode, Origin, Policy, make_rule
from runtime.policyfile import write_policy
from runtime.trafficlog import schema_path
from tests.harness import Topology, python_bin
from tests.harness.interceptor import Interceptor
from tests.harness.upstream import UpstreamCA, read_records, redirect_to_interceptor, wait_ready

pytestmark = pytest.mark.e2e

PROXY_UID = 64121
CLIENT_UID = 64122
CONFIG = "/work/.copilot_here/network.json"
NAMES = ("api.github.com", "slow.test", "evil.test")
LOG_FS_BYTES = 256 * 1024
PAGE = 4096

#: Requests on one keep-alive connection; one JSON line per request, then an end marker.
CLIENT = """
import http.client, json, ssl, sys
host, ca, prefix, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
conn = None
for i in range(count):
    path = f"{prefix}{i}"
    try:
        if conn is None:
            conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=20)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        print(json.dumps({"path": path, "status": resp.status, "body": body,
                          "decision": resp.headers.get("X-Secure-Proxy-Decision"),
                          "retry_after": resp.headers.get("Retry-After")}), flush=True)
    except Exception as exc:
        conn = None
        print(json.dumps({"path": path, "status": None, "error": repr(exc)}), flush=True)
print("CLIENT-END")
"""


def policy() -> Policy:
    user = Origin("user", CONFIG)
    rules = [make_rule("api.github.com", ["/repos/"], origin=user), make_rule("slow.test")]
    return Policy.build(Mode.ENFORCE, True, rules, CONFIG)


@dataclass
class Box:
    topo: Topology
    work: Path
    logs: Path
    interceptor: Interceptor
    records: Path  # the upstream's own account of every request it received

    def requests(self, prefix: str, count: int, host: str = "api.github.com") -> list[dict]:
        code = textwrap.dedent(CLIENT)
        argv = [python_bin(), "-c", code, host, str(self.interceptor.proxy_ca), prefix, str(count)]
        r = self.topo.box_run(argv, user=CLIENT_UID, env={"HOME": "/tmp"}, timeout=120)
        out = r.stdout.splitlines()
        assert out[-1:] == ["CLIENT-END"], (r.stdout, r.stderr)  # the client ran to its end
        return [json.loads(line) for line in out[:-1]]

    def lines(self) -> list[str]:
        return self.interceptor.log_file.read_text().splitlines()

    def reached_upstream(self, marker: str) -> list[str]:
        """Paths of the requests the upstream received whose path holds `marker`."""
        return [
            r["path"]
            for r in read_records(self.records)
            if r.get("ev") == "request" and marker in r["path"]
        ]


@pytest.fixture(scope="module")
def box(module_topology: Topology, staged_source: str) -> Iterator[Box]:
    topo = module_topology
    topo.set_hosts({name: topo.net_ip for name in NAMES})
    work = Path(tempfile.mkdtemp(prefix="sp-e2e-log-", dir="/tmp"))
    work.chmod(0o755)
    ca = UpstreamCA.create(work / "upstream", names=list(NAMES))
    for name in ("run", "logs", "ca", "confdir"):
        (work / name).mkdir(mode=0o755)
        os.chown(work / name, PROXY_UID, PROXY_UID)
    (work / "confdir").chmod(0o700)
    logs = work / "logs"
    options = f"size={LOG_FS_BYTES},mode=0755,uid={PROXY_UID},gid={PROXY_UID}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "sp-e2e-logs", str(logs)], check=True)
    records = work / "upstream-records.jsonl"
    server = topo.net_popen(
        [
            *(python_bin(), "-m", "tests.harness.upstream", "serve", "--record", str(records)),
            *("--cert", str(ca.server_cert), "--key", str(ca.server_key)),
        ],
        env={"PYTHONPATH": staged_source},
        stderr=subprocess.DEVNULL,
        text=True,
    )
    interceptor: Interceptor | None = None
    try:
        wait_ready(server)
        redirect_to_interceptor(topo, PROXY_UID)
        write_policy(policy(), work / "run" / "policy.json")
        interceptor = Interceptor(
            topo,
            uid=PROXY_UID,
            source=staged_source,
            policy_file=work / "run" / "policy.json",
            log_file=logs / "traffic.jsonl",
            confdir=work / "confdir",
            proxy_ca=work / "ca" / "ca.pem",
            marker=work / "run" / "interceptor.ready",
            err_path=work / "interceptor.err",
            upstream_ca=ca.ca_cert,
        ).start()
        yield Box(topo, work, logs, interceptor, records)
    finally:
        if interceptor is not None:
            interceptor.stop()
        topo.stop(server)
        subprocess.run(["umount", "-l", str(logs)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def valid_lines(box: Box) -> list[dict[str, Any]]:
    """Every line of the log, each whole, valid JSON and valid against the schema."""
    schema = json.loads(schema_path().read_text())
    records = [json.loads(line) for line in box.lines()]
    for record in records:
        jsonschema.validate(record, schema)
    return records


def fill(logs: Path, leave: int) -> Path:
    """A file that takes all the space of the logs filesystem but `leave` bytes."""
    st = os.statvfs(logs)
    free = st.f_bavail * st.f_frsize
    filler = logs / "filler"
    with filler.open("wb") as out:
        out.write(b"\0" * max(free - leave, 0))
    return filler


def test_full_disk_refuses_requests_and_every_forwarded_one_is_logged(box: Box):
    marker = f"fill{secrets.token_hex(4)}"
    filler = fill(box.logs, 3 * PAGE)  # room for a dozen requests or so
    results = box.requests(f"/repos/{marker}/", 60)
    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 503}, results
    assert 200 in statuses and 503 in statuses, statuses  # it filled up while they ran
    assert statuses[-10:] == [503] * 10, statuses  # and stays refused while full
    for refused in (r for r in results if r["status"] == 503):
        assert refused["decision"] == "block; reason=log_unavailable", refused
        assert refused["retry_after"] == "5"
        assert refused["body"].startswith(f"BLOCKED: GET https://api.github.com{refused['path']}")
        assert "reason: log_unavailable" in refused["body"]

    # The upstream's own record: what was allowed arrived, nothing refused did, and
    # every request that arrived has a whole, valid start line in the log.
    arrived = box.reached_upstream(marker)
    assert sorted(arrived) == sorted(r["path"] for r in results if r["status"] == 200)
    starts = {
        line["path"]: line
        for line in valid_lines(box)
        if line["phase"] == "start" and marker in line["path"]
    }
    for path in arrived:
        start = starts[path]
        assert (start["method"], start["host"], start["action"]) == (
            "GET",
            "api.github.com",
            "ALLOW",
        )
    assert "traffic log" in box.interceptor.errors() and "cannot write" in box.interceptor.errors()

    # Room again: requests go through, and are logged, start and end.
    filler.unlink()
    again = box.requests(f"/repos/{marker}-again/", 3)
    assert [r["status"] for r in again] == [200] * 3, again
    logged = [
        (line["phase"], line["path"])
        for line in valid_lines(box)
        if f"{marker}-again" in (line["path"] or "")
    ]
    assert sorted(logged) == sorted((phase, r["path"]) for r in again for phase in ("start", "end"))
    assert "writing again" in box.interceptor.errors()


def test_kill9_while_in_flight_leaves_the_start_line(box: Box):
    """The upstream has the request and is slow to answer; the interceptor dies with -9.
    The request that went out is in the log: its start line, written before it left."""
    marker = f"kill{secrets.token_hex(4)}"
    path = f"/slow/4000/{marker}"
    client = box.topo.box_popen(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(box.interceptor.proxy_ca),
            f"https://slow.test{path}?token=s3cret",
        ],
        user=CLIENT_UID,
        env={"HOME": "/tmp"},
    )
    deadline = time.monotonic() + 15
    while not box.reached_upstream(marker):
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.05)
    box.interceptor.kill9()
    _out, err = client.communicate(timeout=30)
    assert client.returncode != 0, err  # it never got its answer
    mine = [line for line in valid_lines(box) if (line["path"] or "").endswith(marker)]
    assert [line["phase"] for line in mine] == ["start"], mine
    [start] = mine
    assert (start["method"], start["host"], start["path"]) == ("GET", "slow.test", path)
    assert "s3cret" not in "\n".join(box.lines())

    # A new interceptor appends to the same log; every line stays whole.
    box.interceptor.start()
    after = box.requests(f"/repos/{marker}/", 2)
    assert [r["status"] for r in after] == [200, 200], after
    assert len([x for x in valid_lines(box) if marker in (x["path"] or "")]) == 1 + 4
