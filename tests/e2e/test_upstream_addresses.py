"""Allowed names pointed at addresses off the internet (DNS rebinding), against real servers.

The box runs the interceptor and, on its loopback, a recording server (the
container's own services); the net host has a recording server on every address,
a link-local 169.254.169.254 (the cloud metadata address) and a private 10.x
address among them, and a DNS server whose answer for `rebind.test` changes after
the first query. Every name below is allowed by a rule; the hosts file or the DNS
points it where the test says. What arrived is read from the servers' own
records, never from the client's side alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from runtime.core.policy import Mode, Origin, Policy, make_rule
from runtime.policyfile import write_policy
from tests.harness import Topology, python_bin
from tests.harness.dns import DnsServer
from tests.harness.interceptor import Interceptor
from tests.harness.upstream import UpstreamCA, read_records, redirect_to_interceptor, wait_ready

pytestmark = pytest.mark.e2e

PROXY_UID = 64131
CLIENT_UID = 64132
CONFIG = "/work/.copilot_here/network.json"
METADATA = "169.254.169.254"
LAN = "10.77.0.5"
#: Allowed names and where the box's hosts file points them: off the internet...
REFUSED = {
    "loopback.test": "127.0.0.1",
    "loopback6.test": "::1",
    "mapped.test": "::ffff:127.0.0.1",
    "metadata.test": METADATA,
    "lan.test": LAN,
}
#: ... and the same addresses under rules that say `allow_private_addresses`.
PERMITTED = {
    "ok-loopback.test": "127.0.0.1",
    "ok-metadata.test": METADATA,
    "ok-lan.test": LAN,
}
#: IP-literal rules: their own address is allowed.
LITERALS = ("127.0.0.1", LAN)
REBIND = "rebind.test"  # in the DNS only: first the net host, then loopback


def policy(mode: Mode = Mode.ENFORCE) -> Policy:
    user = Origin("user", CONFIG)
    rules = [make_rule(name, origin=user) for name in (*REFUSED, REBIND, "public.test")]
    rules += [make_rule(n, origin=user, allow_private_addresses=True) for n in PERMITTED]
    rules += [make_rule(ip, origin=user) for ip in LITERALS]
    return Policy.build(mode, True, rules, CONFIG)


class RebindingDns(DnsServer):
    """Answers `rebind.test` with the net host once, and with loopback from then on."""

    def __init__(self, bind: str, first: str) -> None:
        super().__init__([bind], {REBIND: [first]})

    def _answer(self, data: bytes, proto: str, client: Any) -> bytes | None:
        answer = super()._answer(data, proto, client)
        last = self.queries[-1] if self.queries else {}
        if last.get("name") == REBIND and last.get("answers"):
            self.records[REBIND] = ["127.0.0.1"]
        return answer

    def a_queries(self) -> int:
        return sum(q["name"] == REBIND and q["qtype"] == 1 for q in self.queries)


@dataclass
class Env:
    topo: Topology
    work: Path
    proxy_ca: Path
    interceptor: Interceptor
    box_records: Path  # the box's loopback server: the container's own services
    net_records: Path  # the net host's server: public, link-local and private addresses
    dns: RebindingDns

    def curl(self, url: str, *extra: str) -> tuple[int, str]:
        argv = ["curl", "-sS", "--max-time", "20", "--cacert", str(self.proxy_ca), *extra]
        argv += ["-w", "\n%{http_code}", url]
        r: CompletedProcess[str] = self.topo.box_run(
            argv, user=CLIENT_UID, env={"HOME": "/tmp"}, timeout=30
        )
        assert r.returncode == 0, (url, r.stderr)
        body, _, status = r.stdout.rpartition("\n")
        return int(status), body

    def arrived(self, since: tuple[int, int]) -> list[dict[str, Any]]:
        """Connections the servers accepted since `since` (from self.mark())."""
        time.sleep(0.3)  # a late connection would show up now
        box, net = read_records(self.box_records), read_records(self.net_records)
        return [r for r in box[since[0] :] + net[since[1] :] if r["ev"] == "open"]

    def mark(self) -> tuple[int, int]:
        return len(read_records(self.box_records)), len(read_records(self.net_records))

    def log(self) -> list[dict[str, Any]]:
        path = self.work / "logs" / "traffic.jsonl"
        text = path.read_text() if path.exists() else ""
        return [x for x in map(json.loads, text.splitlines()) if x["phase"] == "end"]

    def reload(self, new: Policy) -> None:
        err = self.interceptor.err_path
        before = err.read_text().count("policy reload")
        write_policy(new, self.interceptor.policy_file)
        os.kill(self.interceptor.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while err.read_text().count("policy reload") == before:
            assert time.monotonic() < deadline, "no reload logged"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def env(module_topology: Topology, staged_source: str) -> Iterator[Env]:
    topo = module_topology
    topo.add_address(METADATA)
    topo.add_address(LAN)
    topo.set_hosts({**REFUSED, **PERMITTED, "public.test": topo.net_ip})
    dns = topo.in_net(lambda: RebindingDns(topo.net_ip, topo.net_ip).start())

    work = Path(tempfile.mkdtemp(prefix="sp-e2e-addr-", dir="/tmp"))
    work.chmod(0o755)
    names = [*REFUSED, *PERMITTED, REBIND, "public.test"]
    ca = UpstreamCA.create(work / "upstream", names=names, ips=list(LITERALS))
    for d in ("run", "logs", "ca", "confdir"):
        (work / d).mkdir(mode=0o755)
        os.chown(work / d, PROXY_UID, PROXY_UID)
    (work / "confdir").chmod(0o700)

    servers = []
    records = {}
    for side, popen in (("box", topo.box_popen), ("net", topo.net_popen)):
        records[side] = work / f"{side}-records.jsonl"
        server = popen(
            [
                *(python_bin(), "-m", "tests.harness.upstream", "serve"),
                *("--cert", str(ca.server_cert), "--key", str(ca.server_key)),
                *("--record", str(records[side])),
            ],
            env={"PYTHONPATH": staged_source},
            stderr=(work / f"{side}-server.err").open("w"),
            text=True,
        )
        wait_ready(server)
        servers.append(server)
    redirect_to_interceptor(topo, PROXY_UID)

    policy_file = work / "run" / "policy.json"
    write_policy(policy(), policy_file)
    interceptor = Interceptor(
        topo,
        uid=PROXY_UID,
        source=staged_source,
        policy_file=policy_file,
        log_file=work / "logs" / "traffic.jsonl",
        confdir=work / "confdir",
        proxy_ca=work / "ca" / "ca.pem",
        marker=work / "run" / "interceptor.ready",
        err_path=work / "interceptor.err",
        upstream_ca=ca.ca_cert,
    ).start()
    yield Env(topo, work, work / "ca" / "ca.pem", interceptor, records["box"], records["net"], dns)
    interceptor.stop()
    for server in servers:
        topo.stop(server)
    dns.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_reachable_first(env: Env):
    """The servers answer: a refusal below is the interceptor's, not a dead server's."""
    since = env.mark()
    status, body = env.curl("https://public.test/x")
    assert status == 200 and json.loads(body)["local"] == env.topo.net_ip
    # Straight from the box as root (not redirected: the REDIRECT spares no uid but
    # the proxy's, so ask as the proxy uid), every address of the test is served.
    for address in ("127.0.0.1", "[::1]", METADATA, LAN):
        r = env.topo.box_run(
            ["curl", "-sS", "--max-time", "5", f"http://{address}/probe"], user=PROXY_UID
        )
        assert r.returncode == 0 and '"path": "/probe"' in r.stdout, (address, r.stderr)
    assert len(env.arrived(since)) == 5


@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_an_allowed_name_pointed_off_the_internet_is_refused(env: Env, name: str, scheme: str):
    since, logged = env.mark(), len(env.log())
    status, body = env.curl(f"{scheme}://{name}/latest/meta-data/iam")
    assert status == 403, body
    assert body.startswith(f"BLOCKED: GET {scheme}://{name}/latest/meta-data/iam\n"), body
    assert "reason: private_address" in body
    assert f"address: {REFUSED[name]} (" in body
    assert '"allow_private_addresses": true' in body
    assert env.arrived(since) == []  # nothing reached the box's or the network's servers
    [line] = env.log()[logged:]
    assert (line["action"], line["reason"], line["host"], line["status"]) == (
        "BLOCK",
        "private_address",
        name,
        403,
    )


def test_the_rule_field_and_ip_literal_rules_let_them_through(env: Env):
    for name, address in PERMITTED.items():
        since = env.mark()
        status, body = env.curl(f"https://{name}/x")
        assert status == 200, (name, body)
        seen = json.loads(body)
        # Connected to the address itself, with the name as TLS server name.
        assert (seen["local"], seen["sni"], seen["host"]) == (address, name, name)
        assert len(env.arrived(since)) == 1
    for address in LITERALS:
        status, body = env.curl(f"http://{address}/x")
        assert status == 200 and json.loads(body)["local"] == address, body


def test_dns_rebinding_cannot_swap_the_checked_address(env: Env):
    """The name is resolved once per connection and that address is the one connected to:
    the answer that follows (loopback) is checked like any other, never used unchecked."""
    since = env.mark()
    # The client dials without asking the DNS: every answer goes to the interceptor.
    dial = ("--resolve", f"{REBIND}:443:{env.topo.net_ip}")
    status, body = env.curl(f"https://{REBIND}/first", *dial)
    assert status == 200 and json.loads(body)["local"] == env.topo.net_ip, body
    assert env.dns.a_queries() == 1  # one lookup: mitmproxy did not resolve it again
    assert env.dns.records[REBIND] == ["127.0.0.1"]  # the next answer points home
    status, body = env.curl(f"https://{REBIND}/second", *dial)
    assert status == 403 and "reason: private_address" in body, body
    assert "address: 127.0.0.1 (loopback)" in body
    arrived = env.arrived(since)
    assert [r["local"] for r in arrived] == [env.topo.net_ip], arrived


def test_monitor_connects_and_logs_a_violation(env: Env):
    try:
        env.reload(policy(Mode.MONITOR))
        since, logged = env.mark(), len(env.log())
        status, body = env.curl("https://loopback.test/x")
        assert status == 200 and json.loads(body)["local"] == "127.0.0.1", body
        assert len(env.arrived(since)) == 1
        [line] = env.log()[logged:]
        assert (line["action"], line["violation"], line["reason"]) == (
            "ALLOW",
            True,
            "private_address",
        )
    finally:
        env.reload(policy())
