"""Two network namespaces joined by a veth pair: a "box" (the container) and a "net" host.

    with Topology() as topo:
        topo.box_run(["curl", ...], user=1000)
        server = topo.net_popen([...])

The box has IPv4 and IPv6 default routes through the net host, so every address
added to the net host with add_address() looks like an internet host from inside
the box. Names resolve in the box through /etc/netns/<box>/hosts (bind-mounted over
/etc/hosts by `ip netns exec`), and its resolv.conf points at the net host.

Namespaces outlive the processes that created them, so every Topology registers
itself under /run/sp-harness/ with its creator's pid; cleanup_leftovers() removes
namespaces of dead creators (crashed earlier runs) and never touches live ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

T = TypeVar("T")

NS_PREFIX_BOX = "spbox-"
NS_PREFIX_NET = "spnet-"
_NS_RE = re.compile(r"^sp(?:box|net)-([0-9a-f]{6})$")
REGISTRY_DIR = Path(os.environ.get("SP_HARNESS_REGISTRY", "/run/sp-harness"))
NETNS_ETC = Path("/etc/netns")

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_NAMES = ("api.github.com", "npm.registry.test", "example.com", "evil.test")

User = int | tuple[int, int] | None

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def _proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _creator_alive(record: Mapping[str, Any]) -> bool:
    pid = int(record.get("pid", 0))
    return pid > 0 and _proc_starttime(pid) == record.get("starttime")


def list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_ns_pids(ns: str) -> None:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    for tok in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(tok), signal.SIGKILL)


def _delete_ns(ns: str) -> None:
    _kill_ns_pids(ns)
    # Deleting a namespace also deletes the veth end inside it (and so its peer).
    _run(["ip", "netns", "delete", ns], check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def cleanup_leftovers() -> list[str]:
    """Remove harness namespaces whose creating process is gone. Returns the names removed."""
    removed = []
    for ns in list_netns():
        m = _NS_RE.match(ns)
        if not m:
            continue
        reg = REGISTRY_DIR / f"{m.group(1)}.json"
        try:
            record = json.loads(reg.read_text())
        except (OSError, ValueError):
            record = {}
        if record and _creator_alive(record):
            continue
        logger.info("harness: removing leftover namespace {}", ns)
        _delete_ns(ns)
        removed.append(ns)
    # /etc/netns dirs and registry entries left without a namespace.
    if NETNS_ETC.is_dir():
        live = set(list_netns())
        for d in NETNS_ETC.iterdir():
            if _NS_RE.match(d.name) and d.name not in live:
                reg = REGISTRY_DIR / f"{d.name.split('-', 1)[1]}.json"
                with contextlib.suppress(OSError, ValueError):
                    if _creator_alive(json.loads(reg.read_text())):
                        continue
                shutil.rmtree(d, ignore_errors=True)
    if REGISTRY_DIR.is_dir():
        live = set(list_netns())
        for reg in REGISTRY_DIR.glob("*.json"):
            rid = reg.stem
            if f"{NS_PREFIX_BOX}{rid}" in live or f"{NS_PREFIX_NET}{rid}" in live:
                continue
            try:
                alive = _creator_alive(json.loads(reg.read_text()))
            except (OSError, ValueError):
                alive = False
            if not alive:
                reg.unlink(missing_ok=True)
    return removed


def run_in_netns(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn(*args, **kwargs) in a fresh thread that has joined network namespace `ns`.

    setns(CLONE_NEWNET) only moves the calling thread, so the test process stays in
    the root namespace. Sockets created inside fn belong to `ns` for their lifetime.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _tcp_probe(addr: str, port: int, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            return True
        except OSError:
            return False


class Topology:
    """A box namespace and a net-host namespace, joined by a veth pair.

    Attributes: run_id, box, net (namespace names), box_ip/net_ip (IPv4),
    box_ip6/net_ip6 (IPv6), box_if/net_if (veth names), hosts (name -> [addresses]).
    """

    def __init__(
        self,
        hosts: Mapping[str, str | Sequence[str]] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-f]{6}", self.run_id):
            raise ValueError("run_id must be 6 lowercase hex digits")
        self.box = f"{NS_PREFIX_BOX}{self.run_id}"
        self.net = f"{NS_PREFIX_NET}{self.run_id}"
        self.box_if = f"vb-{self.run_id}"
        self.net_if = f"vn-{self.run_id}"
        # The namespaces are isolated, so these only need to be distinct for readability.
        n = int(self.run_id, 16) % 512
        self.v4_prefix = f"198.{18 + n // 256}.{n % 256}"
        self.v4_net = ipaddress.ip_network(f"{self.v4_prefix}.0/24")
        self.v6_net = ipaddress.ip_network(f"2001:db8:{n:x}::/64")
        self.net_ip = f"{self.v4_prefix}.1"
        self.box_ip = f"{self.v4_prefix}.2"
        # Canonical text (2001:db8::1 for n = 0, not 2001:db8:0::1): tools and DNS
        # answers print it so, and tests compare strings.
        self.net_ip6 = str(self.v6_net[1])
        self.box_ip6 = str(self.v6_net[2])
        self.extra_addresses: list[str] = []
        self.hosts: dict[str, list[str]] = {name: [self.net_ip] for name in DEFAULT_NAMES}
        if hosts:
            self.hosts.update({k: [v] if isinstance(v, str) else list(v) for k, v in hosts.items()})
        self.nameservers: list[str] = [self.net_ip]
        self._procs: list[subprocess.Popen[Any]] = []
        self._started = False

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Topology:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Topology:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        record = {"pid": pid, "starttime": _proc_starttime(pid), "box": self.box, "net": self.net}
        (REGISTRY_DIR / f"{self.run_id}.json").write_text(json.dumps(record))
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for ns in (self.box, self.net):
            _run(["ip", "netns", "add", ns])
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        # Both veth ends are born inside the namespaces: nothing appears in the root ns.
        _run(
            [
                *("ip", "link", "add", self.box_if, "netns", self.box, "type", "veth"),
                *("peer", "name", self.net_if, "netns", self.net),
            ]
        )
        for ns, ifname, v4, v6 in (
            (self.box, self.box_if, self.box_ip, self.box_ip6),
            (self.net, self.net_if, self.net_ip, self.net_ip6),
        ):
            ipn = ["ip", "-n", ns]
            # No DAD at all, link-local included: a tentative fe80:: address silently
            # drops the first neighbour advertisements and makes early IPv6 flaky.
            _run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw"]
                + [f"net.ipv6.conf.{i}.accept_dad=0" for i in ("all", "default", ifname)]
            )
            _run([*ipn, "link", "set", "lo", "up"])
            _run([*ipn, "addr", "add", f"{v4}/24", "dev", ifname])
            _run([*ipn, "-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad"])
            _run([*ipn, "link", "set", ifname, "up"])
        _run(["ip", "-n", self.box, "route", "add", "default", "via", self.net_ip])
        _run(["ip", "-n", self.box, "-6", "route", "add", "default", "via", self.net_ip6])
        self.write_etc()
        self._wait_link_ready()

    def _wait_link_ready(self, timeout: float = 5.0) -> None:
        """Wait until both veth ends can really send.

        Until the kernel's linkwatch runs (up to a second after link up) a veth keeps
        the noop qdisc, which drops everything: the first neighbour solicitation is
        lost and the first IPv6 packet then waits a full second. Wait that out here.
        """
        deadline = time.monotonic() + timeout
        for ns, ifname in ((self.box, self.box_if), (self.net, self.net_if)):
            while True:
                link = _run(["ip", "-n", ns, "link", "show", "dev", ifname]).stdout
                addrs = _run(["ip", "-n", ns, "-6", "addr"]).stdout
                if "LOWER_UP" in link and "qdisc noop" not in link and "tentative" not in addrs:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ifname} in {ns} not ready: {link} {addrs}")
                time.sleep(0.02)

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        for p in self._procs:
            self._stop(p)
        self._procs.clear()
        for ns in (self.box, self.net):
            try:
                _delete_ns(ns)
            except Exception as exc:  # keep tearing down the rest
                logger.warning("harness: deleting {} failed: {}", ns, exc)
        (REGISTRY_DIR / f"{self.run_id}.json").unlink(missing_ok=True)

    @staticmethod
    def _stop(p: subprocess.Popen[Any]) -> None:
        if p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=3)

    # ----------------------------------------------------------------- addressing

    def add_address(self, addr: str) -> str:
        """Give the net host one more address (v4 or v6) so it acts as another internet host."""
        ip = ipaddress.ip_address(addr)
        if ip.version == 4:
            plen = 24 if ip in self.v4_net else 32
            _run(["ip", "-n", self.net, "addr", "add", f"{addr}/{plen}", "dev", self.net_if])
        else:
            plen = 64 if ip in self.v6_net else 128
            _run(
                [
                    *("ip", "-n", self.net, "-6", "addr", "add", f"{addr}/{plen}"),
                    *("dev", self.net_if, "nodad"),
                ]
            )
        self.extra_addresses.append(addr)
        return addr

    def set_hosts(self, mapping: Mapping[str, str | Sequence[str]], replace: bool = False) -> None:
        """Set names resolved by the box's /etc/hosts (name -> address or addresses)."""
        if replace:
            self.hosts = {}
        self.hosts.update({k: [v] if isinstance(v, str) else list(v) for k, v in mapping.items()})
        self.write_etc()

    def set_nameservers(self, servers: Sequence[str]) -> None:
        self.nameservers = list(servers)
        self.write_etc()

    @property
    def resolv_conf(self) -> Path:
        """The box's resolv.conf as seen from the root namespace (pass to --resolv-conf)."""
        return NETNS_ETC / self.box / "resolv.conf"

    def write_etc(self) -> None:
        etc = NETNS_ETC / self.box
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for name, addrs in self.hosts.items():
            lines += [f"{a}\t{name}" for a in addrs]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("".join(f"nameserver {s}\n" for s in self.nameservers))
        for f in ("hosts", "resolv.conf"):
            (etc / f).chmod(0o644)

    # ----------------------------------------------------------------- processes

    @staticmethod
    def _env(env: Mapping[str, str] | None) -> dict[str, str]:
        base = {"PATH": BASE_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"}
        if env:
            base.update(env)
        return base

    @staticmethod
    def wrap(ns: str, argv: Sequence[str], user: User = None) -> list[str]:
        """The argv that runs `argv` inside namespace `ns`, as `user` (uid or (uid, gid))."""
        cmd = ["ip", "netns", "exec", ns]
        if user is not None:
            uid, gid = user if isinstance(user, tuple) else (user, user)
            cmd += ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups"]
        return cmd + [str(a) for a in argv]

    def _run_in(
        self,
        ns: str,
        argv: Sequence[str],
        user: User,
        env: Mapping[str, str] | None,
        timeout: float,
        input: str | None,
        check: bool,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.wrap(ns, argv, user),
            env=self._env(env),
            cwd="/",
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=check,
            start_new_session=True,
        )

    def box_run(
        self,
        argv: Sequence[str],
        user: User = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
        input: str | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the box and wait for it. Output is captured as text."""
        return self._run_in(self.box, argv, user, env, timeout, input, check)

    def net_run(
        self,
        argv: Sequence[str],
        user: User = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
        input: str | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        return self._run_in(self.net, argv, user, env, timeout, input, check)

    def _popen(
        self, ns: str, argv: Sequence[str], user: User, env: Mapping[str, str] | None, **kw: Any
    ) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("cwd", "/")
        p = subprocess.Popen(
            self.wrap(ns, argv, user), env=self._env(env), start_new_session=True, **kw
        )
        self._procs.append(p)
        return p

    def box_popen(
        self,
        argv: Sequence[str],
        user: User = None,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start a background process in the box; it is killed at teardown."""
        return self._popen(self.box, argv, user, env, **kw)

    def net_popen(
        self,
        argv: Sequence[str],
        user: User = None,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start a background process (a server) on the net host; killed at teardown."""
        return self._popen(self.net, argv, user, env, **kw)

    def stop(self, p: subprocess.Popen[Any]) -> None:
        self._stop(p)

    # ----------------------------------------------------------------- in-process helpers

    def in_box(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn in a thread inside the box's network namespace (as root, in-process)."""
        return run_in_netns(self.box, fn, *args, **kwargs)

    def in_net(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn in a thread inside the net host's network namespace (as root, in-process)."""
        return run_in_netns(self.net, fn, *args, **kwargs)

    def wait_tcp(
        self, ns: str, addr: str, port: int, timeout: float = 10.0, proc: Any = None
    ) -> None:
        """Wait until addr:port accepts TCP connections, probing from inside namespace ns."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if run_in_netns(ns, _tcp_probe, addr, port, 0.5):
                return
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"process exited with {proc.returncode} before listening: {err}")
            time.sleep(0.05)
        raise TimeoutError(f"{addr}:{port} not listening in {ns} after {timeout}s")
