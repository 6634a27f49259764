"""Inbound connections through `copilot_here --engine sandbox`: the agent may listen,
but nothing from outside reaches it, so it cannot accept a connection and send data
out over it. Probed from the sandbox's uplink (the test internet's net host)."""

from __future__ import annotations

import json
import os

import pytest

from tests.harness import python_bin
from tests.harness.sandbox import Session, enforce, write_config

pytestmark = pytest.mark.e2e

# Runs as the agent (appuser) in the sandbox: listen on every address, say where,
# report whatever arrives, then a marker proving the script reached its end.
AGENT = r"""
import socket, subprocess
out = subprocess.run(["ip", "-o", "addr", "show", "dev", "eth0"],
                     capture_output=True, text=True).stdout
addrs = [f.split()[3].split("/")[0] for f in out.splitlines()
         if " inet" in f and " fe80:" not in f]
tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
tcp.bind(("::", 7777)); tcp.listen(5); tcp.settimeout(0.2)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", 7778)); udp.settimeout(0.2)
print("ADDRS", *addrs, flush=True)
while input() != "STOP":
    for sock in (tcp, udp):
        try:
            if sock is tcp:
                conn, peer = tcp.accept(); conn.sendall(b"agent-data"); conn.close()
            else:
                _, peer = udp.recvfrom(100); udp.sendto(b"agent-data", peer)
            print("ARRIVED", peer[0], flush=True)
        except TimeoutError:
            pass
    print("POLLED", flush=True)
print("END", flush=True)
"""

CLIENT = r"""
import json, socket, sys
addr, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.connect((addr, port))
    if proto == "udp":
        s.send(b"hello")
    print(json.dumps({"status": "ok", "data": s.recv(100).decode()}))
except OSError as exc:
    print(json.dumps({"status": type(exc).__name__}))
"""


def test_connections_from_outside_never_reach_a_listening_agent(internet, project):
    write_config(project, enforce("api.github.com"))
    # The agent's stdin is a pipe we write to: a FIFO in the project tells it when to stop.
    fifo = project / "ctl"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    command = f"python3 -c '{AGENT}' < /work/ctl"
    with Session(project, ["--", "sh", "-c", command], internet) as s:
        with open(fifo, "w") as ctl:
            addrs = s.wait_for(lambda line: line.startswith("ADDRS")).split()[1:]
            assert any(":" in a for a in addrs) and any("." in a for a in addrs), addrs
            results = {}
            for addr in addrs:
                for port, proto in ((7777, "tcp"), (7778, "udp")):
                    r = internet.topo.net_run([python_bin(), "-c", CLIENT, addr, str(port), proto])
                    results[(addr, proto)] = json.loads(r.stdout)
            ctl.write("POLL\nSTOP\n")
        seen: list[str] = []
        s.wait_for(lambda line: seen.append(line) or line == "END")
        assert s.wait() == 0, s.stderr
    assert all(res["status"] != "ok" for res in results.values()), results
    # And on the agent's side, after it polled everything queued: nothing arrived.
    assert "POLLED" in seen and not [ln for ln in seen if ln.startswith("ARRIVED")], seen
