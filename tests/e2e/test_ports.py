"""A rule's `ports`, end to end: `copilot_here --engine sandbox` in enforce mode, git
over SSH to a real sshd in the test internet.

The net host runs an sshd (its own config, host key and authorized key, all in the
test's directory) on ports 22 and 2222 of four addresses: the two a test resolver
answers for git.ports.test (IPv4 and IPv6) and two others. sshd's own log says
which connections arrived, on which address and port: that is what shows a refused
connection never left the box.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.trafficlog import schema_path
from tests.harness import Topology
from tests.harness.sandbox import Internet, Resolver, run_cli, sh, step, write_config

pytestmark = pytest.mark.e2e

APP_UID = 1000  # the sandbox's appuser when the CLI runs as root
NAME = "git.ports.test"
MARKER = "served over ssh by the test sshd"


@dataclass
class Net:
    internet: Internet
    resolver: Resolver
    work: Path
    repo: Path
    sshd_log: Path
    ip4: str
    ip6: str
    other4: str
    other6: str

    def arrivals(self) -> list[str]:
        """`address port` of every connection sshd accepted from elsewhere than the net
        host itself (the fixture's readiness probes), in order."""
        own = {self.ip4, self.ip6, self.other4, self.other6}
        out = []
        for line in self.sshd_log.read_text(errors="replace").splitlines():
            # "Connection from 198.18.1.2 port 41234 on 198.18.1.1 port 22 rdomain """
            if line.startswith("Connection from ") and " on " in line:
                source = line.split()[2]
                where = line.split(" on ", 1)[1].split()
                if source not in own:
                    out.append(f"{where[0]} {where[2]}")
        return out


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


#: The test resolver's records, from the four addresses sshd listens on
#: (ip4, ip6, other4, other6).
Records = Callable[[str, str, str, str], dict[str, Any]]


def name_records(ip4: str, ip6: str, other4: str, other6: str) -> dict[str, Any]:
    return {NAME: [ip4, ip6]}


@contextlib.contextmanager
def ports_net(topo: Topology, staged_source: str, records: Records = name_records):
    """The test internet, a test resolver answering `records`, and sshd."""
    work = Path(tempfile.mkdtemp(prefix="sp-ports-", dir="/tmp"))
    os.chmod(work, 0o755)
    # Its record: every connection the web server took, on which address (other4 too).
    internet = Internet.start(topo, work, staged_source, record=work / "web.jsonl")
    other4 = topo.add_address(f"{topo.v4_prefix}.77")
    other6 = topo.add_address(str(topo.v6_net[0x77]))
    answers = records(topo.net_ip, topo.net_ip6, other4, other6)
    resolver = Resolver.start(topo, answers, staged_source)
    # The repository sshd serves (root's: sshd logs in as root with the test's key).
    seed = work / "seed"
    seed.mkdir()
    (seed / "README").write_text(MARKER + "\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(seed)]
    _run("git", "init", "-q", "-b", "main", str(seed))
    _run(*git, "add", "README")
    _run(*git, "commit", "-q", "-m", "seed")
    repo = work / "repo.git"
    _run("git", "clone", "-q", "--bare", str(seed), str(repo))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "hostkey"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "client"))
    shutil.copy(work / "client.pub", work / "authorized_keys")
    addresses = [topo.net_ip, topo.net_ip6, other4, other6]
    (work / "sshd_config").write_text(
        "\n".join(
            [
                "Port 22",
                "Port 2222",
                *(f"ListenAddress {a}" for a in addresses),
                f"HostKey {work / 'hostkey'}",
                f"AuthorizedKeysFile {work / 'authorized_keys'}",
                "PidFile none",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
    sshd_log = work / "sshd.log"
    with sshd_log.open("w") as log:
        sshd = topo.net_popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    for address in addresses:
        topo.wait_tcp(topo.net, address, 22, proc=sshd)
    net = Net(internet, resolver, work, repo, sshd_log, topo.net_ip, topo.net_ip6, other4, other6)
    net.arrivals()  # readable
    try:
        yield net
    finally:
        topo.stop(sshd)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def net(module_topology, staged_source) -> Iterator[Net]:
    with ports_net(module_topology, staged_source) as n:
        yield n


@pytest.fixture
def world(net: Net) -> Iterator[dict[str, Path]]:
    base = Path(tempfile.mkdtemp(prefix="sp-ports-run-", dir="/tmp"))
    os.chmod(base, 0o755)
    project, home, state = base / "project", base / "home", base / "state"
    project.mkdir()
    home.mkdir()
    # The client key, for the appuser inside (ssh wants it 0600 and its own).
    shutil.copy(net.work / "client", project / "client-key")
    for path in (project, project / "client-key"):
        os.chown(path, APP_UID, APP_UID)
    yield {"project": project, "home": home, "state": state, "logs": base / "logs"}
    shutil.rmtree(base, ignore_errors=True)


def cli(world: dict[str, Path], net: Net, args: list[str]):
    env = {"HOME": str(world["home"]), "XDG_STATE_HOME": str(world["state"])}
    logs = ["--logs-dir", str(world["logs"])]
    return run_cli(world["project"], [*logs, *args], net.internet, timeout=120, env=env)


CONNECT = (
    "import socket,sys\n"
    "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.settimeout(5)\n"
    "s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "print(s.recv(64))\n"
)


FORGE = (
    "import json,socket,sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
    "s.connect('/run/secure-proxy/portkeeper/keeper.sock')\n"
    "s.send(json.dumps({'name': sys.argv[1], 'addresses': sys.argv[2:], 'ttl': 600}).encode())\n"
    "print(s.recv(4096))\n"
)


def agent(net: Net) -> str:
    ssh = (
        "ssh -i /tmp/k -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "-o BatchMode=yes -o ConnectTimeout=5"
    )
    url = f"ssh://root@{NAME}{net.repo}"
    connect = f'python3 -c "{CONNECT}"'
    return "\n".join(
        [
            "cp /work/client-key /tmp/k && chmod 600 /tmp/k",
            step(
                "clone4",
                f"GIT_SSH_COMMAND='{ssh} -4' git clone -q {url} /tmp/c4 && "
                f"grep -q '{MARKER}' /tmp/c4/README",
            ),
            step(
                "clone6",
                f"GIT_SSH_COMMAND='{ssh} -6' git clone -q {url} /tmp/c6 && "
                f"grep -q '{MARKER}' /tmp/c6/README",
            ),
            # The agent asks the port keeper itself to open the other addresses.
            step("forge", f'python3 -c "{FORGE}" {NAME} {net.other4} {net.other6}'),
            # While the name's addresses are open: the same port elsewhere, another port there.
            step("other4", f"{connect} {net.other4} 22"),
            step("other6", f"{connect} {net.other6} 22"),
            step("port4", f"{connect} {net.ip4} 2222"),
            step("again4", f"{connect} {net.ip4} 22"),
            "( echo \"http $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "
            f'http://{NAME}/)" )',
            "echo END",
        ]
    )


def line(stdout: str, tag: str) -> str:
    (found,) = [x for x in stdout.splitlines() if x.startswith(f"{tag} ")]
    return found


def dns_records(world: dict[str, Path]) -> list[dict]:
    log = world["logs"] / "traffic.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [r for r in records if r.get("kind") == "dns" and r["host"] == NAME]


def config(*rules: dict) -> dict:
    return {
        "enabled": True,
        "mode": "enforce",
        "inherit_defaults": False,
        "log_to_file": True,
        "allowed_rules": list(rules),
    }


def test_a_ports_rule_lets_git_over_ssh_reach_exactly_the_answered_addresses(net, world):
    write_config(
        world["project"], config({"host": "*.ports.test", "ports": [22]}), state=str(world["state"])
    )
    before = len(net.arrivals())
    r = cli(world, net, ["--", *sh(agent(net))])
    out = r.stdout
    assert out.splitlines()[-1:] == ["END"], (out, r.stderr)  # every probe ran
    # git clone over SSH, IPv4 and IPv6, to the addresses the resolver gave the name.
    assert line(out, "clone4") == "clone4 ok", out
    assert line(out, "clone6") == "clone6 ok", out
    assert line(out, "again4").startswith("again4 ok"), out  # still open (its TTL)
    # The same port on another address of the same server, and another port on the
    # opened address: refused at once, while the name's entries are open.
    for tag in ("other4", "other6", "port4"):
        assert "ConnectionRefusedError" in line(out, tag), out
    # Only proxy-user (the DNS guard) may write to the port keeper's socket.
    assert "PermissionError" in line(out, "forge"), out
    # A ports-only rule grants no HTTP: the interceptor refuses it.
    assert line(out, "http") == "http 403", out
    time.sleep(0.5)  # sshd logs each connection as it accepts it
    arrived = net.arrivals()[before:]
    assert f"{net.ip4} 22" in arrived and f"{net.ip6} 22" in arrived, arrived
    assert not [a for a in arrived if a.split()[0] in (net.other4, net.other6)], arrived
    assert f"{net.ip4} 2222" not in arrived, arrived
    # The traffic log's DNS record says what each answer opened.
    records = dns_records(world)
    schema = json.loads(schema_path().read_text())
    for record in records:
        jsonschema.validate(record, schema)
    opened = {tuple(r["opened"]) for r in records if r["opened"]}
    assert (f"{net.ip4}:22",) in opened and (f"[{net.ip6}]:22",) in opened, records


def test_a_ports_rule_for_another_name_opens_nothing_for_this_one(net, world):
    """The name resolves (an HTTP rule names it), but its ports rule is another's."""
    rules = ({"host": NAME, "allowed_paths": ["/"]}, {"host": "other.ports.test", "ports": [22]})
    write_config(world["project"], config(*rules), state=str(world["state"]))
    before = len(net.arrivals())
    r = cli(world, net, ["--", *sh(agent(net))])
    out = r.stdout
    assert out.splitlines()[-1:] == ["END"], (out, r.stderr)
    for tag in ("clone4", "clone6", "other4", "other6", "port4", "again4"):
        assert line(out, tag).startswith(f"{tag} failed"), out
    assert "ConnectionRefusedError" in line(out, "again4"), out
    time.sleep(0.5)
    assert net.arrivals()[before:] == []
    records = dns_records(world)
    assert records and all(r["opened"] is None for r in records), records
