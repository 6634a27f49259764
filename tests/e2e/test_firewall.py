"""The firewall in a real network namespace, probed by unprivileged numeric uids.

Box = the container, net host = the internet. The net host listens on TCP 80, 443,
22, 8080, 5432 and UDP 443, 9999 (answering with a banner naming the port) and
serves DNS on its resolv.conf address and on an address that is *not* in it. In the
box, a plain listener on 127.0.0.1/::1:58080 stands in for the interceptor.
"""

from __future__ import annotations

import json
import re

import pytest

from runtime import paths
from runtime.core.policy import Mode, Policy, make_rule
from tests.harness import python_bin

pytestmark = pytest.mark.e2e

APP_UID = 64001
PROXY_UID = 64002
PORT = paths.INTERCEPTOR_PORT
UDP_REJECTED = ("EPERM", "ECONNREFUSED", "EHOSTUNREACH")
FAST = 1.0  # seconds: a rejected connection must fail well within this

NET_SERVER = r"""
import socket, sys, threading
def tcp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(50)
    while True:
        c, _ = s.accept(); c.sendall(b"net:%d" % port); c.close()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        _, peer = s.recvfrom(100); s.sendto(b"net-udp:%d" % port, peer)
for p in (80, 443, 22, 8080, 5432):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
for p in (443, 9999):
    threading.Thread(target=udp, args=(p,), daemon=True).start()
print("READY", flush=True)
threading.Event().wait()
"""

INTERCEPTOR = r"""
import socket, sys, threading
def serve(addr, fam):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(sys.argv[1]))); s.listen(50)
    while True:
        c, peer = s.accept(); print("got", peer[0], flush=True)
        c.sendall(b"interceptor"); c.close()
threading.Thread(target=serve, args=("127.0.0.1", socket.AF_INET), daemon=True).start()
threading.Thread(target=serve, args=("::1", socket.AF_INET6), daemon=True).start()
threading.Event().wait()
"""

CLIENT = r"""
import errno, json, socket, sys, time
addr, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
res, t = {}, time.monotonic()
try:
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((addr, port))
    if proto == "udp":
        s.send(b"ping")
    res["banner"] = s.recv(100).decode()
    res["status"] = "ok"
except TimeoutError:
    res["status"] = "timeout"
except OSError as e:
    res["status"] = errno.errorcode.get(e.errno, str(e.errno))
res["elapsed"] = time.monotonic() - t
print(json.dumps(res))
"""


def save(topo, family: int) -> str:
    """iptables-legacy-save of the box without comments and counters."""
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    out = topo.box_run([tool], check=True).stdout
    lines = [re.sub(r" \[\d+:\d+\]$", "", ln) for ln in out.splitlines() if not ln.startswith("#")]
    return "\n".join(lines)


def significant(text: str) -> str:
    """iptables-save text without the tables that hold nothing: a table shows up,
    empty, once anything has opened it."""
    out: list[str] = []
    table: list[str] = []
    for line in text.splitlines():
        table.append(line)
        if line == "COMMIT":
            body = table[1:-1]
            if any(ln.startswith("-A") or not ln.endswith(" ACCEPT") for ln in body):
                out += table
            table = []
    return "\n".join(out)


class Env:
    def __init__(self, topo, src, run_dir):
        self.topo, self.src, self.run_dir = topo, src, run_dir
        self.env = {"PYTHONPATH": src, "SECURE_PROXY_RUN_DIR": str(run_dir)}

    def firewall(self, *args, user=None, prefix=()):
        argv = [*prefix, python_bin(), "-m", "firewall", *args]
        return self.topo.box_run(argv, user=user, env=self.env, timeout=60)

    def apply(self, *extra):
        return self.firewall("apply", "--proxy-user", str(PROXY_UID), *extra)

    def connect(self, addr, port, proto="tcp", user=APP_UID):
        r = self.topo.box_run(
            [python_bin(), "-c", CLIENT, addr, str(port), proto], user=user, timeout=15
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def dns(self, server, tcp=False, port=53, user=APP_UID, qtype="A"):
        argv = [python_bin(), "-m", "tests.harness.dns", "query", "--server", server]
        argv += ["--name", "example.com", "--type", qtype, "--port", str(port), "--timeout", "3"]
        if tcp:
            argv.append("--tcp")
        r = self.topo.box_run(argv, user=user, env={"PYTHONPATH": self.src}, timeout=15)
        return json.loads(r.stdout)


def _start_servers(topo, src) -> tuple[str, str]:
    """Net-host services and a DNS server on an address outside resolv.conf."""
    other4 = topo.add_address(f"{topo.v4_prefix}.9")
    other6 = topo.add_address(topo.net_ip6.replace("::1", "::9"))
    srv = topo.net_popen([python_bin(), "-c", NET_SERVER], text=True)
    assert srv.stdout.readline().strip() == "READY"
    records = {"example.com": [topo.net_ip, topo.net_ip6]}
    binds = [topo.net_ip, topo.net_ip6, other4, other6]
    bind_args = [arg for b in binds for arg in ("--bind", b)]
    dns = topo.net_popen(
        [
            python_bin(),
            "-m",
            "tests.harness.dns",
            "serve",
            *bind_args,
            "--records",
            json.dumps(records),
        ],
        env={"PYTHONPATH": src},
        text=True,
    )
    assert dns.stdout.readline().strip() == "READY"
    return other4, other6


def _docker_output(topo, src) -> None:
    """What Docker does in a container's namespace for its embedded DNS (127.0.0.11)."""
    for cmd in (
        ["-t", "nat", "-N", "DOCKER_OUTPUT"],
        ["-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT"],
        [
            "-t",
            "nat",
            "-A",
            "DOCKER_OUTPUT",
            "-d",
            "127.0.0.11/32",
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "127.0.0.11:5353",
        ],
    ):
        topo.box_run(["iptables-legacy", *cmd], check=True)
    dns = topo.box_popen(
        [
            python_bin(),
            "-m",
            "tests.harness.dns",
            "serve",
            "--bind",
            "127.0.0.11",
            "--port",
            "5353",
            "--records",
            json.dumps({"example.com": ["198.18.0.99"]}),
        ],
        env={"PYTHONPATH": src},
        text=True,
    )
    assert dns.stdout.readline().strip() == "READY"


@pytest.fixture(scope="module")
def fw(module_topology, staged_source, tmp_path_factory):
    topo = module_topology
    topo.set_nameservers([topo.net_ip, topo.net_ip6])
    run_dir = tmp_path_factory.mktemp("run")
    e = Env(topo, staged_source, run_dir)
    e.other4, e.other6 = _start_servers(topo, staged_source)
    _docker_output(topo, staged_source)
    icp = topo.box_popen([python_bin(), "-c", INTERCEPTOR, str(PORT)], text=True)
    topo.wait_tcp(topo.box, "127.0.0.1", PORT, proc=icp)
    topo.wait_tcp(topo.box, "::1", PORT, proc=icp)
    e.docker_before = [ln for ln in save(topo, 4).splitlines() if "DOCKER_OUTPUT" in ln]
    # Before the lock, the box reaches the net host directly (the test is meaningful).
    assert e.connect(topo.net_ip, 443)["banner"] == "net:443"
    assert e.connect(topo.net_ip6, 22)["banner"] == "net:22"
    r = e.apply()
    assert r.returncode == 0, r.stderr
    assert (run_dir / "firewall.verified").is_file()
    return e


# ----------------------------------------------------------------------- app user


@pytest.mark.parametrize("port", [80, 443])
@pytest.mark.parametrize("fam", [4, 6])
def test_web_ports_go_to_interceptor(fw, fam, port):
    for addr in (fw.topo.net_ip, fw.other4) if fam == 4 else (fw.topo.net_ip6, fw.other6):
        res = fw.connect(addr, port)
        assert res["status"] == "ok" and res["banner"] == "interceptor", res


@pytest.mark.parametrize("port", [22, 8080, 5432])
@pytest.mark.parametrize("fam", [4, 6])
def test_other_ports_refused_at_once(fw, fam, port):
    res = fw.connect(fw.topo.net_ip if fam == 4 else fw.topo.net_ip6, port)
    assert res["status"] == "ECONNREFUSED", res
    assert res["elapsed"] < FAST, res


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("fam", [4, 6])
def test_dns_to_configured_resolver_works(fw, fam, tcp):
    server = fw.topo.net_ip if fam == 4 else fw.topo.net_ip6
    res = fw.dns(server, tcp=tcp, qtype="A" if fam == 4 else "AAAA")
    assert res["status"] == "ok", res
    assert res["answers"] == [server]


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("fam", [4, 6])
def test_dns_elsewhere_fails_fast(fw, fam, tcp):
    res = fw.dns(fw.other4 if fam == 4 else fw.other6, tcp=tcp)
    assert res["status"] in ("refused", "unreachable", "denied"), res
    assert res["elapsed"] < FAST, res
    # ... even by root: the allowance is per resolver, not per user.
    res = fw.dns(fw.other4 if fam == 4 else fw.other6, tcp=tcp, user=None)
    assert res["status"] != "ok", res


@pytest.mark.parametrize("fam", [4, 6])
def test_udp_443_rejected_and_other_udp_fails(fw, fam):
    addr = fw.topo.net_ip if fam == 4 else fw.topo.net_ip6
    res = fw.connect(addr, 443, "udp")
    # QUIC falls back to TCP at once: a locally REJECTed datagram fails send() with
    # EPERM (the ICMP port-unreachable arrives too, for a later recv: ECONNREFUSED).
    assert res["status"] in UDP_REJECTED, res
    assert res["elapsed"] < FAST, res
    res = fw.connect(addr, 9999, "udp")
    assert res["status"] in UDP_REJECTED, res
    assert res["elapsed"] < FAST, res


def test_no_raw_sockets_for_app_user(fw):
    code = (
        "import socket\n"
        "for fam, proto in ((socket.AF_INET, 1), (socket.AF_INET6, 58), (socket.AF_PACKET, 3)):\n"
        "    try:\n"
        "        socket.socket(fam, socket.SOCK_RAW, proto); print('OPEN')\n"
        "    except PermissionError:\n"
        "        print('denied')\n"
    )
    r = fw.topo.box_run([python_bin(), "-c", code], user=APP_UID)
    assert r.stdout.split() == ["denied"] * 3, r.stdout + r.stderr


def test_app_user_cannot_change_the_firewall(fw):
    before = (save(fw.topo, 4), save(fw.topo, 6))
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        r = fw.topo.box_run([tool, "-I", "OUTPUT", "-j", "ACCEPT"], user=APP_UID)
        assert r.returncode != 0
        r = fw.topo.box_run([tool, "-P", "OUTPUT", "ACCEPT"], user=APP_UID)
        assert r.returncode != 0
    r = fw.firewall("apply", "--proxy-user", str(APP_UID), user=APP_UID)
    assert r.returncode == 1
    assert (save(fw.topo, 4), save(fw.topo, 6)) == before


# ----------------------------------------------------------------------- proxy user


@pytest.mark.parametrize("fam", [4, 6])
def test_proxy_user_goes_direct_on_web_ports_only(fw, fam):
    addr = fw.topo.net_ip if fam == 4 else fw.topo.net_ip6
    for port in (80, 443):
        res = fw.connect(addr, port, user=PROXY_UID)
        assert res["banner"] == f"net:{port}", res
    res = fw.connect(addr, 22, user=PROXY_UID)
    assert res["status"] == "ECONNREFUSED", res
    res = fw.connect(addr, 443, "udp", user=PROXY_UID)
    assert res["status"] in UDP_REJECTED, res


def test_group_of_proxy_user_gives_no_exemption(fw):
    """Sharing the proxy-user's gid (or anything but its uid) grants nothing."""
    res = fw.connect(fw.topo.net_ip, 443, user=(APP_UID, PROXY_UID))
    assert res["banner"] == "interceptor", res


# ----------------------------------------------------------------------- inbound

LISTENER = r"""
import socket, sys, threading
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 7777)); s.listen(5)
    while True:
        c, peer = s.accept(); print("accepted", peer[0], flush=True)
        c.sendall(b"agent-data"); c.close()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 7778))
    while True:
        _, peer = s.recvfrom(100); print("datagram", peer[0], flush=True)
        s.sendto(b"agent-data", peer)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("READY", flush=True)
threading.Event().wait()
"""


@pytest.mark.parametrize("fam", [4, 6])
def test_inbound_connections_are_dropped(fw, fam):
    """An agent listening in the box gets nothing from outside, TCP or UDP: no new
    inbound connection, so no channel to send data out over."""
    box = fw.topo.box_ip if fam == 4 else fw.topo.box_ip6
    listener = fw.topo.box_popen([python_bin(), "-c", LISTENER], user=APP_UID, text=True)
    try:
        assert listener.stdout.readline().strip() == "READY"
        # Loopback inside the box still works: the listener really listens.
        res = fw.connect("127.0.0.1", 7777)
        assert res == {**res, "status": "ok", "banner": "agent-data"}, res
        for port, proto in ((7777, "tcp"), (7778, "udp")):
            r = fw.topo.net_run([python_bin(), "-c", CLIENT, box, str(port), proto], timeout=15)
            res = json.loads(r.stdout)
            assert res["status"] != "ok" and "banner" not in res, (proto, res)
    finally:
        fw.topo.stop(listener)
    peers = [line.split()[-1] for line in listener.stdout.read().splitlines()]
    # Only the loopback probe above got through (as an IPv4-mapped address).
    assert peers == ["::ffff:127.0.0.1"], peers


# ----------------------------------------------------------------------- docker, idempotence


def test_docker_embedded_dns_still_works(fw):
    after = [ln for ln in save(fw.topo, 4).splitlines() if "DOCKER_OUTPUT" in ln]
    assert after == fw.docker_before
    res = fw.dns("127.0.0.11")
    assert res["status"] == "ok" and res["answers"] == ["198.18.0.99"], res


def test_status_and_verify_report_intact(fw):
    r = fw.firewall("status", "--proxy-user", str(PROXY_UID))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-A OUTPUT -j SECURE_PROXY_OUT" in r.stdout
    assert r.stdout.rstrip().endswith("# intact")
    # status lines are verbatim iptables-legacy-save lines
    saved = save(fw.topo, 4) + "\n" + save(fw.topo, 6)
    for line in r.stdout.splitlines():
        if line.startswith("-A "):
            assert line in saved, line
    assert fw.firewall("verify", "--proxy-user", str(PROXY_UID)).returncode == 0


def test_apply_twice_gives_identical_rules(fw):
    before = (save(fw.topo, 4), save(fw.topo, 6))
    r = fw.apply()
    assert r.returncode == 0, r.stderr
    assert (save(fw.topo, 4), save(fw.topo, 6)) == before


def test_tampering_detected_and_reapply_replaces_ours_only(fw):
    marker = fw.run_dir / "firewall.verified"
    fw.topo.box_run(["iptables-legacy", "-I", "SECURE_PROXY_OUT", "1", "-j", "ACCEPT"], check=True)
    fw.topo.box_run(["ip6tables-legacy", "-P", "OUTPUT", "ACCEPT"], check=True)
    r = fw.firewall("verify", "--proxy-user", str(PROXY_UID))
    assert r.returncode == 1
    assert not marker.exists()
    r = fw.firewall("status", "--proxy-user", str(PROXY_UID))
    assert r.returncode == 1 and "NOT intact" in r.stdout
    # A changed setting (another port) replaces our rules, nothing else.
    r = fw.apply("--port", "58081")
    assert r.returncode == 0, r.stderr
    assert "--to-ports 58081" in save(fw.topo, 4) and "--to-ports 58080" not in save(fw.topo, 4)
    r = fw.apply()
    assert r.returncode == 0, r.stderr
    assert marker.is_file()
    assert fw.firewall("verify", "--proxy-user", str(PROXY_UID)).returncode == 0
    assert [ln for ln in save(fw.topo, 4).splitlines() if "DOCKER" in ln] == fw.docker_before


# ----------------------------------------------------------------------- failures


def _clean_env(topology, staged_source, tmp_path):
    e = Env(topology, staged_source, tmp_path)
    (tmp_path / "firewall.verified").write_text("stale\n")
    return e, (save(topology, 4), save(topology, 6))


def test_apply_without_caps_fails_clearly_and_changes_nothing(topology, staged_source, tmp_path):
    e, before = _clean_env(topology, staged_source, tmp_path)
    for drop in ("-net_admin,-net_raw", "-net_raw", "-net_admin"):
        prefix = ["setpriv", "--inh-caps=-all", f"--bounding-set={drop}"]
        r = e.firewall("apply", "--proxy-user", str(PROXY_UID), prefix=prefix)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "iptables needs NET_ADMIN and NET_RAW" in lines[0]
        assert "--cap-add=NET_ADMIN" in lines[0]
    assert (save(topology, 4), save(topology, 6)) == before
    assert not (tmp_path / "firewall.verified").exists()


def test_unknown_proxy_user_fails_clearly(topology, staged_source, tmp_path):
    e, before = _clean_env(topology, staged_source, tmp_path)
    r = e.firewall("apply", "--proxy-user", "no-such-user-xyz")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown proxy-user 'no-such-user-xyz'" in lines[0], r.stderr
    assert (save(topology, 4), save(topology, 6)) == before
    assert not (tmp_path / "firewall.verified").exists()


def test_fresh_box_is_locked_even_before_the_interceptor_runs(topology, staged_source, tmp_path):
    """Interceptor down: web traffic fails closed (refused), never open."""
    e = Env(topology, staged_source, tmp_path)
    srv = topology.net_popen([python_bin(), "-c", NET_SERVER], text=True)
    assert srv.stdout.readline().strip() == "READY"
    assert e.apply().returncode == 0
    for addr in (topology.net_ip, topology.net_ip6):
        res = e.connect(addr, 443)
        assert res["status"] == "ECONNREFUSED" and res["elapsed"] < FAST, res


def test_proxy_user_by_name_needs_passwd_entry(topology, staged_source, tmp_path):
    e = Env(topology, staged_source, tmp_path)
    r = e.firewall("apply", "--proxy-user", "root")
    assert r.returncode == 1
    assert "must not be root" in r.stderr


# ----------------------------------------------------------------------- levels, remove


def _policy_file(tmp_path, name: str, mode: Mode, log: bool) -> str:
    rules = [make_rule("example.com", (), None)] if mode is not Mode.ALLOW_ALL else []
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(Policy.build(mode, log, rules, "test").to_json()))
    return str(path)


def test_log_without_rules_redirects_web_ports_and_touches_nothing_else(
    topology, staged_source, tmp_path
):
    """Rules disabled, log on: TCP 80/443 to the interceptor (for the log), every
    other port, UDP and DNS as without the firewall; the filter table untouched."""
    e = Env(topology, staged_source, tmp_path)
    srv = topology.net_popen([python_bin(), "-c", NET_SERVER], text=True)
    assert srv.stdout.readline().strip() == "READY"
    records = json.dumps({"example.com": [topology.net_ip]})
    serve = ["-m", "tests.harness.dns", "serve", "--bind", topology.net_ip, "--records", records]
    dns = topology.net_popen(
        [python_bin(), *serve],
        env={"PYTHONPATH": staged_source},
        text=True,
    )
    assert dns.stdout.readline().strip() == "READY"
    icp = topology.box_popen([python_bin(), "-c", INTERCEPTOR, str(PORT)], text=True)
    topology.wait_tcp(topology.box, "127.0.0.1", PORT, proc=icp)
    assert not significant(save(topology, 4)) and not significant(save(topology, 6))
    policy = _policy_file(tmp_path, "log", Mode.ALLOW_ALL, True)
    r = e.apply("--policy", policy, "--dns-guard-port", "58053")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "firewall.verified").read_text())["level"] == "intercept"
    for addr in (topology.net_ip, topology.net_ip6):
        for port in (80, 443):
            assert e.connect(addr, port)["banner"] == "interceptor", (addr, port)
            assert e.connect(addr, port, user=PROXY_UID)["banner"] == f"net:{port}"
        for port in (22, 5432):
            assert e.connect(addr, port)["banner"] == f"net:{port}", (addr, port)
        assert e.connect(addr, 443, "udp")["banner"] == "net-udp:443"
    assert e.dns(topology.net_ip)["answers"] == [topology.net_ip]
    for fam in (4, 6):  # only our nat chain: filter (lock, policies) untouched
        assert significant(save(topology, fam)).startswith("*nat\n"), save(topology, fam)
        assert "SECURE_PROXY_NAT" in save(topology, fam) and "--dport 53" not in save(topology, fam)


def test_levels_move_both_ways_and_remove_gives_back_exactly_what_was_there(
    topology, staged_source, tmp_path
):
    e = Env(topology, staged_source, tmp_path)
    _docker_output(topology, staged_source)
    # Someone else's INPUT policy and rules: they must be what remove gives back.
    for rule in (["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"], ["-P", "INPUT", "DROP"]):
        topology.box_run(["iptables-legacy", *rule], check=True)
    before = (significant(save(topology, 4)), significant(save(topology, 6)))
    full = _policy_file(tmp_path, "full", Mode.ENFORCE, True)
    log = _policy_file(tmp_path, "log", Mode.ALLOW_ALL, True)
    off = _policy_file(tmp_path, "off", Mode.ALLOW_ALL, False)
    guard = ("--dns-guard-port", "58053")

    def verify(policy: str) -> int:
        return e.firewall("verify", "--proxy-user", str(PROXY_UID), "--policy", policy, *guard)

    assert e.apply("--policy", full, *guard).returncode == 0
    assert verify(full).returncode == 0
    assert ":OUTPUT DROP" in save(topology, 4) and "--to-ports 58053" in save(topology, 4)
    # Down to the log level: the lock goes, the policies we set come back.
    assert e.apply("--policy", log, *guard).returncode == 0
    v4 = save(topology, 4)
    assert "SECURE_PROXY_OUT" not in v4 and "SECURE_PROXY_IN" not in v4
    assert ":OUTPUT ACCEPT" in v4 and ":INPUT DROP" in v4
    assert "SECURE_PROXY_NAT" in v4 and "--to-ports 58053" not in v4
    assert verify(log).returncode == 0 and verify(full).returncode == 1
    # Off: nothing of ours, exactly what was there before.
    r = e.apply("--policy", off, *guard)
    assert r.returncode == 0, r.stderr
    assert (significant(save(topology, 4)), significant(save(topology, 6))) == before
    assert not (tmp_path / "firewall.verified").exists()
    # Up again, then `remove`.
    assert e.apply("--policy", full, *guard).returncode == 0
    assert (tmp_path / "firewall.policies.json").is_file()
    r = e.firewall("remove", "--proxy-user", str(PROXY_UID))
    assert r.returncode == 0, r.stderr
    assert (significant(save(topology, 4)), significant(save(topology, 6))) == before
    assert not (tmp_path / "firewall.verified").exists()
    assert not (tmp_path / "firewall.policies.json").exists()
    r = e.firewall("remove", "--proxy-user", str(PROXY_UID))  # nothing left to remove
    assert r.returncode == 0, r.stderr
    assert (significant(save(topology, 4)), significant(save(topology, 6))) == before


def _sets(topo) -> list[str]:
    return topo.box_run(["ipset", "list", "-name"], check=True).stdout.split()


def test_ip_literal_ports_open_that_address_only_and_the_sets_follow_the_level(
    topology, staged_source, tmp_path
):
    """A rule `{"host": <IP>, "ports": [5432]}`: at apply the firewall opens 5432 to
    that address for the run (IPv4 and IPv6); the same port elsewhere and another port
    there stay refused. The sets exist at level full only; remove destroys them."""
    e = Env(topology, staged_source, tmp_path)
    other4, other6 = _start_servers(topology, staged_source)
    rules = [
        make_rule(topology.net_ip, ports=[5432], http=False),
        make_rule(topology.net_ip6, ports=[5432], http=False),
    ]
    policy = tmp_path / "ports.json"
    policy.write_text(json.dumps(Policy.build(Mode.ENFORCE, True, rules, "test").to_json()))
    guard = ("--dns-guard-port", "58053")
    r = e.apply("--policy", str(policy), *guard)
    assert r.returncode == 0, r.stderr
    assert sorted(_sets(topology)) == ["sp_ports4", "sp_ports6"]
    for addr, other in ((topology.net_ip, other4), (topology.net_ip6, other6)):
        assert e.connect(addr, 5432)["banner"] == "net:5432", addr
        for where, port in ((other, 5432), (addr, 22)):
            res = e.connect(where, port)
            assert res["status"] == "ECONNREFUSED" and res["elapsed"] < FAST, (where, port, res)
    # Re-applied at level full: the sets and their entries stay (an edit forgets nothing).
    assert e.apply("--policy", str(policy), *guard).returncode == 0
    assert e.connect(topology.net_ip, 5432)["banner"] == "net:5432"
    r = e.firewall("remove", "--proxy-user", str(PROXY_UID))
    assert r.returncode == 0, r.stderr
    assert _sets(topology) == []
    log = _policy_file(tmp_path, "log", Mode.ALLOW_ALL, True)
    assert e.apply("--policy", str(policy), *guard).returncode == 0
    assert e.apply("--policy", log, *guard).returncode == 0
    assert _sets(topology) == []  # the intercept level has no set either
