"""Attacks on a rule's `ports` by the agent inside the sandbox (`copilot_here --engine
sandbox`, enforce mode), checked in sshd's log on the net host: what arrived.

The test resolver plays a hostile upstream for some names under the `*.ports.test`
rule: answers that carry A/AAAA records for other names, or the name's own in the
additional section. Only the addresses of the name's own chain may open.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_ports import APP_UID, NAME, Net, cli, config, line, ports_net, step, world  # noqa: F401
from tests.harness.sandbox import sh, write_config

pytestmark = pytest.mark.e2e

EXTRA = "extra.ports.test"  # answers for itself, and smuggles other names' records
CHAIN = "chain.ports.test"  # a CNAME out of the wildcard: the target's address is its own
SWAP = "swap.ports.test"  # answered (over TCP) as if another name had been asked

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


def test_records_of_other_names_in_an_answer_open_nothing(net, world):  # noqa: F811
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
            # The smuggled addresses: refused, though the answers named them.
            step("other4", probe("connect", net.other4, "22")),
            step("other6", probe("connect", net.other6, "22")),
            # The name's own address and its CNAME's: open.
            step("own4", probe("connect", net.ip4, "22")),
            step("cname6", probe("connect", net.ip6, "22")),
        ],
    )
    for tag in ("ask4", "ask6", "chain", "swap", "own4", "cname6"):
        assert line(out, tag) == f"{tag} ok", out
    for tag in ("other4", "other6"):
        assert "ConnectionRefusedError" in line(out, tag), out
    arrived = net.arrivals()[before:]
    assert sorted(arrived) == sorted([f"{net.ip4} 22", f"{net.ip6} 22"]), arrived
    log = (world["logs"] / "traffic.jsonl").read_text().splitlines()
    opened = {r["host"]: r["opened"] for r in map(json.loads, log) if r.get("kind") == "dns"}
    assert opened == {EXTRA: [f"{net.ip4}:22"], CHAIN: [f"[{net.ip6}]:22"], SWAP: None}, opened


def test_a_live_edit_that_drops_the_ports_rule_closes_the_port(net, world):  # noqa: F811
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
