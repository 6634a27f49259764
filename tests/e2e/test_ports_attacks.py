"""Attacks on a rule's `ports` by the agent inside the sandbox (`copilot_here --engine
sandbox`, enforce mode), checked in sshd's log on the net host: what arrived.

- The test resolver plays a hostile upstream for some names under the `*.ports.test`
  rule: answers that carry A/AAAA records for other names, the name's own in the
  additional section, or (over TCP) another question's. Only the addresses of the
  asked name's own chain may open, and never one off the internet (the resolver's
  own, loopback, the metadata address as IPv4-mapped IPv6).
- A live edit that drops the ports rule closes the port for new connections.
- With the sandbox's namespace set up as Docker's on a user-defined network (a local
  resolver address, unprivileged low ports), the agent tries to answer the DNS
  guard's upstream lookups itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import test_ports
from tests.e2e.test_ports import APP_UID, NAME, Net, cli, config, line, ports_net
from tests.harness import python_bin
from tests.harness.sandbox import cli_argv, cli_env, sandbox_nameservers, sh, step, write_config
from tests.harness.upstream import read_records

pytestmark = pytest.mark.e2e

world = test_ports.world  # a fresh project, home, state and logs directory per test

EXTRA = "extra.ports.test"  # answers for itself, and smuggles other names' records
CHAIN = "chain.ports.test"  # a CNAME out of the wildcard: the target's address is its own
SWAP = "swap.ports.test"  # answered (over TCP) as if another name had been asked
WEB = "web.ports.test"  # an HTTP rule's name the resolver has no record for
LOCAL = "local.ports.test"  # the resolver's own (private) address, loopback, metadata

#: Run as appuser in the box: raw DNS queries through the resolv.conf server (so the
#: DNS guard), and TCP connects. Stdlib only.
PROBE = r"""
import socket, struct, sys, time

def ns():
    return next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))

def ask(name, qtype, transport="udp"):
    q = struct.pack("!HHHHHH", 0x5150, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", {"A": 1, "AAAA": 28}[qtype], 1)
    if transport == "tcp":
        with socket.create_connection((ns(), 53), timeout=5) as s:
            s.sendall(struct.pack("!H", len(q)) + q)
            return len(s.recv(4096))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(q, (ns(), 53))
        return len(s.recv(4096))

def connect(address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(5)
        s.connect((address, int(port)))
        return s.recv(64)

if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "ask":
        print(ask(*args))
    elif cmd == "connect":
        print(connect(*args))
    elif cmd == "until-refused":  # name address port seconds: how many got through
        name, address, port, seconds = args
        through, deadline = 0, time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            try:
                ask(name, "A")
            except OSError:
                pass
            try:
                connect(address, port)
                through += 1
                time.sleep(0.1)
            except ConnectionRefusedError:
                break
        else:
            sys.exit(f"still open after {seconds} s ({through} through)")
        for _ in range(3):  # and it stays closed, the name asked again
            ask(name, "A")
            try:
                connect(address, port)
                through += 1
            except ConnectionRefusedError:
                pass
        print(f"through={through}")
"""


def hostile(ip4: str, ip6: str, other4: str, other6: str) -> dict[str, Any]:
    smuggled = [["elsewhere.test", "A", other4], ["elsewhere.test", "AAAA", other6]]
    return {
        NAME: [ip4, ip6],
        EXTRA: {
            "answer": [[EXTRA, "A", ip4], *smuggled],
            "additional": [[EXTRA, "A", other4], [EXTRA, "AAAA", other6]],
        },
        CHAIN: {"answer": [[CHAIN, "CNAME", "edge.cdn.test"], ["edge.cdn.test", "AAAA", ip6]]},
        SWAP: {"question": "elsewhere.test", "answer": smuggled},
        LOCAL: {
            "answer": [
                *([LOCAL, "A", a] for a in (*sandbox_nameservers(), "127.0.0.1")),
                [LOCAL, "AAAA", "::ffff:169.254.169.254"],
            ]
        },
    }


@pytest.fixture(scope="module")
def net(module_topology, staged_source) -> Iterator[Net]:
    with ports_net(module_topology, staged_source, hostile) as n:
        yield n


def run(where: dict[str, Path], net: Net, lines: list[str], *flags: str):
    (where["project"] / "probe.py").write_text(PROBE)
    r = cli(where, net, [*flags, "--", *sh("\n".join([*lines, "echo END"]))])
    assert r.stdout.splitlines()[-1:] == ["END"], (r.stdout, r.stderr)  # every probe ran
    time.sleep(0.5)  # sshd logs each connection as it accepts it
    return r.stdout


def probe(*args: str) -> str:
    return "python3 /work/probe.py " + " ".join(args)


def test_records_of_other_names_in_an_answer_open_nothing(net, world):
    write_config(
        world["project"], config({"host": "*.ports.test", "ports": [22]}), state=str(world["state"])
    )
    before = len(net.arrivals())
    out = run(
        world,
        net,
        [
            step("ask4", probe("ask", EXTRA, "A")),
            step("ask6", probe("ask", EXTRA, "AAAA")),
            step("chain", probe("ask", CHAIN, "AAAA")),
            step("swap", probe("ask", SWAP, "A", "tcp")),
            step("local", probe("ask", LOCAL, "A")),
            # The smuggled addresses: refused, though the answers named them.
            step("other4", probe("connect", net.other4, "22")),
            step("other6", probe("connect", net.other6, "22")),
            # The name's own address and its CNAME's: open.
            step("own4", probe("connect", net.ip4, "22")),
            step("cname6", probe("connect", net.ip6, "22")),
        ],
    )
    for tag in ("ask4", "ask6", "chain", "swap", "local", "own4", "cname6"):
        assert line(out, tag) == f"{tag} ok", out
    for tag in ("other4", "other6"):
        assert "ConnectionRefusedError" in line(out, tag), out
    arrived = net.arrivals()[before:]
    assert sorted(arrived) == sorted([f"{net.ip4} 22", f"{net.ip6} 22"]), arrived
    log = (world["logs"] / "traffic.jsonl").read_text().splitlines()
    opened = {r["host"]: r["opened"] for r in map(json.loads, log) if r.get("kind") == "dns"}
    want = {EXTRA: [f"{net.ip4}:22"], CHAIN: [f"[{net.ip6}]:22"], SWAP: None, LOCAL: []}
    assert opened == want, opened


def test_a_live_edit_that_drops_the_ports_rule_closes_the_port(net, world):
    """With --network-config-write the agent may edit the rules; once an edit takes the
    ports away, a new connection is refused at once, however often the name is asked."""
    path = write_config(
        world["project"], config({"host": NAME, "ports": [22]}), state=str(world["state"])
    )
    for mine in (path.parent, path):  # the agent's to edit, as in a clone of its own
        os.chown(mine, APP_UID, APP_UID)
    edited = json.dumps(config({"host": NAME, "allowed_paths": ["/"]}))
    sock = "/run/secure-proxy/portkeeper/keeper.sock"
    before = len(net.arrivals())
    out = run(
        world,
        net,
        [
            step("ask", probe("ask", NAME, "A")),
            step("open", probe("connect", net.ip4, "22")),
            # The keeper's socket cannot be replaced with one of the agent's.
            step("replace", f"mv {sock} /tmp/k || rm -f {sock} || touch {sock}.x"),
            step("edit", f"echo '{edited}' > /work/.copilot_here/network.json"),
            step("closed", probe("until-refused", NAME, net.ip4, "22", "10")),
            "cat /tmp/closed.out",
        ],
        "--network-config-write",
    )
    for tag in ("ask", "open", "edit", "closed"):
        assert line(out, tag) == f"{tag} ok", out
    assert "Permission denied" in line(out, "replace"), out
    (through,) = [int(x.split("=")[1]) for x in out.splitlines() if x.startswith("through=")]
    arrived = net.arrivals()[before:]
    # The first connection, those made before the edit was in force, and none after.
    assert arrived == [f"{net.ip4} 22"] * (1 + through), (arrived, out)


#: The agent takes proxy-user's DNS flows: bound to the resolver's address and port 53
#: (a local address, as Docker's 127.0.0.11), it sends a datagram to each port the DNS
#: guard asks from (fixed) and each ephemeral port (the interceptor's lookups), before
#: they do. Conntrack then takes their queries for replies on the agent's flows (no
#: DNAT to the real resolver): they reach the agent, which answers them with the
#: address of its choice.
HIJACK = r"""
import socket, struct, subprocess, sys, threading
sys.path.insert(0, "/work")
from probe import ask, connect, ns

name, web, target = sys.argv[1:4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ns(), 53))
refused = 0

def spray(ports):
    global refused
    for port in ports:
        try:
            s.sendto(b"\0" * 12, (ns(), port))
        except OSError:
            refused += 1

def respond():
    while True:
        data, peer = s.recvfrom(4096)
        end = 12
        while data[end]:
            end += data[end] + 1
        end += 5
        rr = struct.pack("!HHHIH", 0xC00C, 1, 1, 600, 4) + socket.inet_aton(target)
        s.sendto(data[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + data[12:end] + rr, peer)
        print("hijacked a query", flush=True)

threading.Thread(target=respond, daemon=True).start()
spray(range(20053, 20053 + 128))  # the ports the DNS guard asks from
print("answer", ask(name, "A"), flush=True)
try:
    print("ssh", connect(target, 22), flush=True)
except OSError as exc:
    print("ssh", repr(exc), flush=True)
# Then the interceptor's lookups (ephemeral ports); it resolves the request's host
# itself (the dialled address is ignored).
spray(range(32768, 61000))
curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"]
curl += ["--resolve", f"{web}:80:198.18.0.99", f"http://{web}/hijacked"]
print("http", subprocess.run(curl, capture_output=True, text=True).stdout, flush=True)
print(f"spray refused {refused}/28360", flush=True)
"""


def dockerish_dns(
    staged_source: str, uplink: str, resolver: str, records: dict[str, Any]
) -> subprocess.Popen[str]:
    """Once the sandbox's firewall is up: its resolver at a local address with its port 53
    DNATed to a resolver in the namespace, and unprivileged ports, as Docker sets up a
    container on a user-defined network (127.0.0.11, ip_unprivileged_port_start=0).
    Returns the resolver process."""
    deadline = time.monotonic() + 60
    ns = None
    while ns is None:
        assert time.monotonic() < deadline, "the sandbox's firewall never came up"
        time.sleep(0.1)
        links = subprocess.run(["ip", "-n", uplink, "-o", "link"], capture_output=True, text=True)
        # The sandbox's veth peer in the uplink is sp-<run id>; its namespace spsbx-<run id>.
        found = [w.split("@")[0] for w in links.stdout.split() if w.startswith("sp-")]
        if found:
            name = "spsbx-" + found[0].removeprefix("sp-").rstrip(":")
            chain = ["ip", "netns", "exec", name, "iptables-legacy", "-w", "-t", "nat", "-S"]
            if "SECURE_PROXY_NAT" in subprocess.run(chain, capture_output=True, text=True).stdout:
                ns = name
    run = ["ip", "netns", "exec", ns]
    for argv in (
        ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"],
        ["ip", "addr", "add", f"{resolver}/32", "dev", "lo"],
        ["iptables-legacy", "-w", "-t", "nat", "-A", "OUTPUT", "-d", resolver, "-p", "udp",
         "--dport", "53", "-j", "DNAT", "--to-destination", f"{resolver}:5353"],
        ["iptables-legacy", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", resolver, "-p", "udp",
         "--sport", "5353", "-j", "SNAT", "--to-source", ":53"],
    ):  # fmt: skip
        subprocess.run([*run, *argv], check=True, capture_output=True)
    serve = ["-m", "tests.harness.dns", "serve", "--bind", resolver, "--port", "5353"]
    proc = subprocess.Popen(
        [*run, python_bin(), *serve, "--records", json.dumps(records)],
        env={"PYTHONPATH": staged_source, "PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout and proc.stdout.readline().strip() == "READY"
    return proc


def test_the_agent_cannot_take_proxy_users_dns_flows(net, world, module_topology, staged_source):
    """The web name has no record: only a hijacked lookup gives it an address."""
    rules = ({"host": NAME, "ports": [22]}, {"host": WEB})
    write_config(world["project"], config(*rules), state=str(world["state"]))
    (world["project"] / "probe.py").write_text(PROBE)
    (world["project"] / "hijack.py").write_text(HIJACK)
    script = "\n".join(
        [
            "while [ ! -e /work/ready ]; do sleep 0.1; done",
            step("hijack", f"python3 /work/hijack.py {NAME} {WEB} {net.other4}"),
            "cat /tmp/hijack.out",
            "echo END",
        ]
    )
    env = {"HOME": str(world["home"]), "XDG_STATE_HOME": str(world["state"])}
    argv = cli_argv(
        ["--logs-dir", str(world["logs"]), "--", *sh(script)],
        module_topology.net,
        net.internet.add_hosts(),
    )
    before = len(net.arrivals())
    cli = subprocess.Popen(
        argv,
        cwd=world["project"],
        env=cli_env({**net.internet.env(), **env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    (resolver,) = net.resolver.addresses
    dns = None
    try:
        dns = dockerish_dns(staged_source, module_topology.net, resolver, {NAME: [net.ip4]})
        (world["project"] / "ready").touch()
        out, err = cli.communicate(timeout=60)
    finally:
        for proc in (cli, dns):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert out.splitlines()[-1:] == ["END"], (out, err)
    time.sleep(0.5)
    arrived = net.arrivals()[before:]
    # Nothing reached the agent's address: neither SSH (the port keeper opened only the
    # real answer's address) nor the web request (the interceptor found no address).
    web = [r for r in read_records(net.work / "web.jsonl") if r.get("local") == net.other4]
    assert (arrived, web) == ([], []), (arrived, web, out)
    # The agent's datagrams from the resolver's port are refused; proxy-user's queries
    # reach the real resolver, whose answers come back.
    assert line(out, "hijack") == "hijack ok", out
    assert "spray refused 28360/28360" in out and "hijacked" not in out, out
    assert "ssh ConnectionRefusedError" in out and "http 502" in out, out
    log = (world["logs"] / "traffic.jsonl").read_text().splitlines()
    opened = [r["opened"] for r in map(json.loads, log) if r.get("kind") == "dns"]
    assert opened == [[f"{net.ip4}:22"]], opened
