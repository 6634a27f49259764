"""Encoded separators cannot climb out of an allowed prefix, on real upstream servers.

Two real servers on the net host decode paths differently (tests/harness/pathservers.py):
nginx decodes `%2F` and then resolves dot segments; a Node static server (WHATWG URL
parser, decodeURIComponent, path.join) takes `\\` for `/` as well. Each test first
sends the climbing paths to its server directly, from the net host, and reads the
server's access log to show that they really are served as `/admin` there (so the
test can fail); then sends them from the box, through the interceptor, which allows
only `/repos/` on that host: the client gets a 403, and the server's log shows that
none of them arrived, while an allowed path, sent last, does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from runtime.core.policy import Mode, Origin, Policy, make_rule
from runtime.policyfile import write_policy
from tests.harness import Topology, python_bin
from tests.harness.pathservers import (
    ADMIN_SECRET,
    REPO_FILE,
    NginxServer,
    NodeStaticServer,
    build_docroot,
    wait_for_entries,
)
from tests.harness.upstream import UpstreamCA, redirect_to_interceptor

pytestmark = pytest.mark.e2e

PROXY_UID = 64121
CLIENT_UID = 64122
CONFIG = "/work/.copilot_here/network.json"
NGINX_HOST = "nginx.test"
NODE_HOST = "node.test"

# Every climbing form, sent to both servers through the interceptor.
CLIMBING = [
    "/repos/x%2f..%2f..%2fadmin",
    "/repos/x%2F..%2F..%2Fadmin",
    "/repos/x%2f..%2F..%2fadmin",
    "/repos/..%2fadmin",
    "/repos/%2e%2e%2fadmin",
    "/repos/%2E%2E%2Fadmin",
    "/repos/x%5c..%5c..%5cadmin",
    "/repos/x%5C..%5C..%5Cadmin",
    "/repos/x\\..\\..\\admin",
    "/repos/..\\admin",
    "/repos/x%2f..\\..%2fadmin",
    "/repos/x%252f..%252f..%252fadmin",
    # two leading slashes: to a WHATWG parser a scheme-relative URL, `repos` its host
    "//repos/admin",
    "///repos/admin",
]

# What each server serves for these paths when they reach it (sent directly): the
# climbing ones are `/admin`; the rest show where the two servers disagree.
NGINX_SERVES = {
    "/repos/x%2f..%2f..%2fadmin": "/admin",
    "/repos/x%2F..%2F..%2Fadmin": "/admin",
    "/repos/x%2f..%2F..%2fadmin": "/admin",
    "/repos/..%2fadmin": "/admin",
    "/repos/%2e%2e%2fadmin": "/admin",
    "/repos/%2E%2E%2Fadmin": "/admin",
    # a backslash is a plain character to nginx on Linux
    "/repos/x\\..\\..\\admin": "/repos/x\\..\\..\\admin",
    "/repos/x%5c..%5c..%5cadmin": "/repos/x\\..\\..\\admin",
    "/repos/x%2f..\\..%2fadmin": "/repos/x/..\\../admin",
}
NODE_SERVES = {
    "/repos/x%2f..%2f..%2fadmin": "/admin",
    "/repos/x%2F..%2F..%2Fadmin": "/admin",
    "/repos/..%2fadmin": "/admin",
    # the WHATWG parser takes '\' for '/'
    "/repos/x\\..\\..\\admin": "/admin",
    "/repos/..\\admin": "/admin",
    # ... and resolves `x%2f..` / `..%2fadmin` as names before decodeURIComponent
    "/repos/x%2f..\\..%2fadmin": "/admin",
    "/repos/x%5c..%5c..%5cadmin": "/repos/x\\..\\..\\admin",
    # `//repos/admin` is the URL https://repos/admin: its path is /admin
    "//repos/admin": "/admin",
    "///repos/admin": "/admin",
}
# Allowed, and must still arrive: plain, with an encoded unreserved character, and with
# an encoded slash that stays inside /repos/ whichever way it is read.
ALLOWED = ["/repos/x/file.txt", "/repos/x/%66ile.txt", "/repos/x%2ffile.txt"]


def enforce_policy() -> Policy:
    user = Origin("user", CONFIG)
    rules = [make_rule(NGINX_HOST, ["/repos/"], origin=user)]
    rules.append(make_rule(NODE_HOST, ["/repos/"], origin=user))
    return Policy.build(Mode.ENFORCE, True, rules, CONFIG)


@dataclass
class Env:
    topo: Topology
    work: Path
    ca: UpstreamCA
    proxy_ca: Path
    addresses: dict[str, str]
    servers: dict[str, NginxServer | NodeStaticServer]
    interceptor: Popen[Any]

    def through_interceptor(self, host: str, path: str) -> tuple[int, str]:
        """(status, body) of a GET from the box, as an ordinary uid: redirected."""
        return self._curl(
            self.topo.box_run, host, path, ["--cacert", str(self.proxy_ca)], CLIENT_UID
        )

    def direct(self, host: str, path: str) -> tuple[int, str]:
        """(status, body) of the same GET sent from the net host straight to the server."""
        resolve = f"{host}:443:{self.addresses[host]}"
        return self._curl(
            self.topo.net_run, host, path, ["--cacert", str(self.ca.ca_cert), "--resolve", resolve]
        )

    def traffic_log(self, wait_for: int = 0) -> list[dict[str, Any]]:
        path = self.work / "logs" / "traffic.jsonl"
        deadline = time.monotonic() + 5
        while True:
            text = path.read_text() if path.exists() else ""
            # One end line per request (its start line was written before it went on).
            lines = [x for x in map(json.loads, text.splitlines()) if x["phase"] == "end"]
            if len(lines) >= wait_for or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    @staticmethod
    def _curl(
        run: Any, host: str, path: str, extra: list[str], user: int | None = None
    ) -> tuple[int, str]:
        argv = ["curl", "-sS", "--http1.1", "--max-time", "20", "--path-as-is", *extra]
        argv += ["-w", "\n%{http_code}", f"https://{host}{path}"]
        r = run(argv, user=user, env={"HOME": "/tmp"}, timeout=30)
        assert r.returncode == 0, (path, r.stderr)
        body, _, status = r.stdout.rpartition("\n")
        return int(status), body


@pytest.fixture(scope="module")
def env(module_topology: Topology, staged_source: str) -> Iterator[Env]:
    topo = module_topology
    addresses = {
        NGINX_HOST: topo.add_address(f"{topo.v4_prefix}.21"),
        NODE_HOST: topo.add_address(f"{topo.v4_prefix}.22"),
    }
    topo.set_hosts(addresses)
    work = Path(tempfile.mkdtemp(prefix="sp-e2e-paths-", dir="/tmp"))
    work.chmod(0o755)
    ca = UpstreamCA.create(work / "upstream", names=list(addresses))
    root = build_docroot(work / "www")
    servers: dict[str, NginxServer | NodeStaticServer] = {
        NGINX_HOST: NginxServer.start(
            topo, work / "nginx", addresses[NGINX_HOST], ca.server_cert, ca.server_key, root
        ),
        NODE_HOST: NodeStaticServer.start(
            topo, work / "node", addresses[NODE_HOST], ca.server_cert, ca.server_key, root
        ),
    }
    redirect_to_interceptor(topo, PROXY_UID)

    for d in ("run", "logs", "ca", "confdir"):
        (work / d).mkdir(mode=0o755)
        os.chown(work / d, PROXY_UID, PROXY_UID)
    (work / "confdir").chmod(0o700)
    policy_file = work / "run" / "policy.json"
    write_policy(enforce_policy(), policy_file)
    marker = work / "run" / "interceptor.ready"
    proxy_ca = work / "ca" / "ca.pem"
    err_path = work / "interceptor.err"
    with err_path.open("w") as err:
        interceptor = topo.box_popen(
            [
                *(python_bin(), "-m", "runtime.container.interceptor"),
                *("--policy", str(policy_file), "--confdir", str(work / "confdir")),
                *("--traffic-log", str(work / "logs" / "traffic.jsonl")),
                *("--ca-cert", str(proxy_ca), "--ready-marker", str(marker)),
            ],
            user=PROXY_UID,
            env={"PYTHONPATH": staged_source, "SECURE_PROXY_UPSTREAM_CA": str(ca.ca_cert)},
            stdout=err,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text().startswith("{")):
        if interceptor.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"interceptor did not start: {err_path.read_text()}")
        time.sleep(0.1)
    yield Env(topo, work, ca, proxy_ca, addresses, servers, interceptor)
    topo.stop(interceptor)
    for server in servers.values():
        topo.stop(server.proc)
    shutil.rmtree(work, ignore_errors=True)


def served_paths(env: Env, host: str, since: int) -> list[str]:
    key = "uri" if host == NGINX_HOST else "served"
    return [entry[key] for entry in env.servers[host].served()[since:]]


def under_repos(path: str) -> bool:
    return path.startswith("/repos/")


@pytest.mark.parametrize(
    ("host", "serves"),
    [(NGINX_HOST, NGINX_SERVES), (NODE_HOST, NODE_SERVES)],
    ids=["nginx", "node"],
)
def test_climbing_paths_never_reach_the_server(env: Env, host: str, serves: dict[str, str]):
    server = env.servers[host]

    # 1. Sent directly, the server really reads these paths its way: the climbing
    #    ones fetch /admin. This is what the interceptor must stop.
    for path, expected in serves.items():
        before = len(server.served())
        status, body = env.direct(host, path)
        wait_for_entries(server, before + 1)
        assert served_paths(env, host, before) == [expected], path
        if expected == "/admin":
            assert (status, body.strip()) == (200, ADMIN_SECRET), path
    assert sum(v == "/admin" for v in serves.values()) >= 3

    # 2. Through the interceptor, every climbing form gets a 403 and none arrives.
    before = len(server.served())
    logged = len(env.traffic_log())
    for path in CLIMBING:
        status, body = env.through_interceptor(host, path)
        assert status == 403, (path, status, body)
        assert body.startswith(f"BLOCKED: GET https://{host}/admin\n"), body
        assert "reason: path_not_allowed" in body and ADMIN_SECRET not in body, body
    # The traffic log names the reading that was refused.
    lines = env.traffic_log(logged + len(CLIMBING))[logged:]
    assert [(x["action"], x["reason"], x["path"]) for x in lines] == [
        ("BLOCK", "path_not_allowed", "/admin")
    ] * len(CLIMBING)

    # 3. Allowed paths still arrive, sent last: the log above was being written.
    for path in ALLOWED:
        status, body = env.through_interceptor(host, path)
        assert (status, body.strip()) == (200, REPO_FILE), path
    wait_for_entries(server, before + len(ALLOWED))
    time.sleep(0.2)  # a late entry for a blocked request would show up now
    arrived = served_paths(env, host, before)
    assert arrived == ["/repos/x/file.txt"] * len(ALLOWED), arrived
    assert all(under_repos(p) for p in arrived)
