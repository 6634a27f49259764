"""Self-test of the namespace harness: the box reaches the net host over v4 and v6."""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest

from tests.harness import python_bin
from tests.harness.dns import query

pytestmark = pytest.mark.e2e

UNPRIV = 64123


def _icmp_echo(addr: str) -> bool:
    """One ICMP / ICMPv6 echo from a raw socket (root, in-process); True if answered."""
    v6 = ":" in addr
    fam, proto, typ = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128) if v6 else (socket.AF_INET, 1, 8)
    )
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        s.settimeout(2)
        body = struct.pack("!HH", 0x1234, 1) + b"harness"
        hdr = struct.pack("!BBH", typ, 0, 0) + body
        if not v6:  # the kernel fills the ICMPv6 checksum, not the ICMP one
            padded = hdr + b"\0" * (len(hdr) % 2)
            csum = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
            csum = (csum >> 16) + (csum & 0xFFFF)
            csum = ~(csum + (csum >> 16)) & 0xFFFF
            hdr = struct.pack("!BBH", typ, 0, csum) + body
        s.sendto(hdr, (addr, 0))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            data = s.recv(2048)
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            if icmp[0] in (0, 129) and icmp[4:6] == b"\x12\x34":
                return True
    return False


def test_ping_both_families(topology):
    assert topology.in_box(_icmp_echo, topology.net_ip)
    assert topology.in_box(_icmp_echo, topology.net_ip6)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_tcp_from_box_to_net_host_as_unprivileged_uid(topology, staged_source, family):
    addr = topology.net_ip if family == "v4" else topology.net_ip6
    srv = topology.net_popen(
        [
            python_bin(),
            "-c",
            "import http.server as h; h.test(h.BaseHTTPRequestHandler, "
            f"h.ThreadingHTTPServer, port=8000, bind='{addr}')",
        ],
    )
    topology.wait_tcp(topology.net, addr, 8000, proc=srv)
    code = (
        "import socket,sys; s=socket.create_connection((sys.argv[1], 8000), timeout=3); "
        "print(s.getpeername()[0])"
    )
    r = topology.box_run([python_bin(), "-c", code, addr], user=UNPRIV, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == addr
    uid = topology.box_run(["id", "-u"], user=UNPRIV).stdout.strip()
    assert uid == str(UNPRIV)


def test_extra_address_and_hosts_file(topology):
    extra = topology.add_address(f"{topology.v4_prefix}.7")
    far = topology.add_address("198.19.254.9")
    topology.set_hosts({"evil.test": extra, "far.test": far})
    r = topology.box_run(["getent", "hosts", "api.github.com", "evil.test", "far.test"])
    assert r.returncode == 0, r.stderr
    lines = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()}
    assert lines["api.github.com"] == topology.net_ip
    assert lines["evil.test"] == extra
    assert lines["far.test"] == far
    for a in (extra, far):
        assert topology.in_box(_icmp_echo, a)
    conf = topology.box_run(["cat", "/etc/resolv.conf"]).stdout
    assert f"nameserver {topology.net_ip}" in conf


def test_dns_server_on_net_host(topology, staged_source):
    records = {"example.com": [topology.net_ip, topology.net_ip6]}
    srv = topology.net_popen(
        [
            python_bin(),
            "-m",
            "tests.harness.dns",
            "serve",
            "--bind",
            topology.net_ip,
            "--bind",
            topology.net_ip6,
            "--records",
            json.dumps(records),
        ],
        env={"PYTHONPATH": staged_source},
        text=True,
    )
    assert srv.stdout.readline().strip() == "READY"
    env = {"PYTHONPATH": staged_source}
    for server, tcp, qtype, want in (
        (topology.net_ip, False, "A", topology.net_ip),
        (topology.net_ip, True, "A", topology.net_ip),
        (topology.net_ip6, False, "AAAA", topology.net_ip6),
        (topology.net_ip6, True, "AAAA", topology.net_ip6),
    ):
        argv = [
            python_bin(),
            "-m",
            "tests.harness.dns",
            "query",
            "--server",
            server,
            "--name",
            "example.com",
            "--type",
            qtype,
        ] + (["--tcp"] if tcp else [])
        r = topology.box_run(argv, user=UNPRIV, env=env, timeout=10)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["answers"] == [want]
    # Unknown name: NXDOMAIN. A port with no server: refused quickly.
    res = topology.in_box(query, topology.net_ip, "nope.test")
    assert res["status"] == "nxdomain"
    res = topology.in_box(query, topology.net_ip, "example.com", port=5353, timeout=2)
    assert res["status"] == "refused"


def test_teardown_removes_everything():
    from tests.harness import Topology
    from tests.harness.netns import NETNS_ETC, REGISTRY_DIR, list_netns

    with Topology() as topo:
        p = topo.box_popen(["sleep", "60"])
        assert topo.box in list_netns()
    assert topo.box not in list_netns() and topo.net not in list_netns()
    assert not (NETNS_ETC / topo.box).exists()
    assert not (REGISTRY_DIR / f"{topo.run_id}.json").exists()
    assert p.poll() is not None
    assert os.geteuid() == 0
