"""`--engine sandbox`: the container without a container engine.

The same init runs as PID 1 in new Linux namespaces (net, mount, pid, uts,
ipc), as root, built only from util-linux (`unshare`, `nsenter`) and iproute2:

    host                                    sandbox (PID 1 = secure-proxy-init)
    ----                                    -----------------------------------
    ip netns add spsbx-<id>                 / = overlay(lower: host /, upper: tmpfs)
    veth eth0 <-> uplink                    /proc new, /dev bound, /run /tmp /home tmpfs
      (host + NAT, or --sandbox-netns NS)   /work, /work/.copilot_here, /logs bound
    nsenter --net unshare --mount --pid     runtime laid by runtime.install (reused venv)

Every write the sandbox makes to /etc, /run, /ca, /home, /usr/local, /opt and
/var lands in the overlay's tmpfs upper layer and disappears with the mount
namespace: users, the CA store and policy never touch the host. Only the bind
mounts (project, config dirs, logs dir) are shared, as with Docker volumes.
The only host state created is the network namespace, a veth pair and (NAT
mode) two iptables rules, all removed at exit; leftovers of a killed run are
removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

NS_PREFIX = "spsbx-"
REGISTRY = Path(os.environ.get("SECURE_PROXY_SANDBOX_REGISTRY", "/run/secure-proxy-sandbox"))
STAGE_PARENT = Path(os.environ.get("SECURE_PROXY_SANDBOX_STAGE", "/tmp"))
HOSTNAME = "copilot-here"
SANDBOX_IF = "eth0"
DEFAULT_VENV = "/opt/sp-venv"
SOURCE_ROOT = Path(__file__).resolve().parents[2]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class SandboxError(Exception):
    pass


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass
class Spec:
    command: list[str]
    mounts: list[Mount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    add_hosts: list[tuple[str, str]] = field(default_factory=list)
    netns: str | None = None
    reuse_venv: str = field(default_factory=lambda: os.environ.get("SP_VENV", DEFAULT_VENV))
    source: str = str(SOURCE_ROOT)
    stage: str = ""
    run_id: str = ""
    cap_drop: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data = json.loads(text)
        data["mounts"] = [Mount(**m) for m in data["mounts"]]
        data["add_hosts"] = [tuple(h) for h in data["add_hosts"]]
        return cls(**data)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise SandboxError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


# ----------------------------------------------------------------------------- host side


def _starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict[str, object]) -> bool:
    pid = int(str(record.get("pid", 0)))
    return pid > 0 and _starttime(pid) == record.get("starttime")


class Network:
    """The sandbox's network namespace and its uplink (v4 + v6)."""

    def __init__(self, run_id: str, uplink_ns: str | None) -> None:
        self.run_id = run_id
        self.ns = f"{NS_PREFIX}{run_id}"
        self.uplink_ns = uplink_ns
        self.peer_if = f"sp-{run_id}"
        self.nat_rules: list[list[str]] = []
        n = int(run_id, 16)
        self.index = n % 250 + 1
        self.v4_prefix = f"100.64.{self.index}"
        self.v6_prefix = f"fd5b:{n & 0xFFFF:x}:{self.index:x}"

    @property
    def gateway(self) -> str:
        return f"{self.v4_prefix}.1"

    @property
    def address(self) -> str:
        return f"{self.v4_prefix}.2"

    @property
    def gateway6(self) -> str:
        return f"{self.v6_prefix}::1"

    @property
    def address6(self) -> str:
        return f"{self.v6_prefix}::2"

    def _uplink_ip(self) -> list[str]:
        return ["ip", "-n", self.uplink_ns] if self.uplink_ns else ["ip"]

    def _pick_subnet(self) -> None:
        used = _run([*self._uplink_ip(), "-o", "addr", "show"], check=False).stdout
        for _ in range(250):
            if f" {self.v4_prefix}." not in used:
                return
            self.index = self.index % 250 + 1
            self.v4_prefix = f"100.64.{self.index}"
            self.v6_prefix = f"fd5b:{int(self.run_id, 16) & 0xFFFF:x}:{self.index:x}"
        raise SandboxError("no free 100.64.x.0/24 subnet for the sandbox uplink")

    def create(self) -> None:
        if self.uplink_ns and not Path(f"/run/netns/{self.uplink_ns}").exists():
            raise SandboxError(
                f"--sandbox-netns {self.uplink_ns}: no such network namespace (ip netns list)"
            )
        self._pick_subnet()
        _run(["ip", "netns", "add", self.ns])
        inside = ["ip", "-n", self.ns]
        sysctl = ["ip", "netns", "exec", self.ns, "sysctl", "-qw"]
        _run([*sysctl, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
        peer_ns = ["netns", self.uplink_ns] if self.uplink_ns else []
        _run(
            [
                "ip",
                "link",
                "add",
                self.peer_if,
                *peer_ns,
                "type",
                "veth",
                "peer",
                "name",
                SANDBOX_IF,
                "netns",
                self.ns,
            ]
        )
        up = self._uplink_ip()
        if self.uplink_ns:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.uplink_ns,
                    "sysctl",
                    "-qw",
                    f"net.ipv6.conf.{self.peer_if}.accept_dad=0",
                ],
                check=False,
            )
        else:
            _run(["sysctl", "-qw", f"net.ipv6.conf.{self.peer_if}.accept_dad=0"], check=False)
        _run([*up, "addr", "add", f"{self.gateway}/24", "dev", self.peer_if])
        _run([*up, "-6", "addr", "add", f"{self.gateway6}/64", "dev", self.peer_if, "nodad"])
        _run([*up, "link", "set", self.peer_if, "up"])
        _run([*inside, "link", "set", "lo", "up"])
        _run([*inside, "addr", "add", f"{self.address}/24", "dev", SANDBOX_IF])
        _run([*inside, "-6", "addr", "add", f"{self.address6}/64", "dev", SANDBOX_IF, "nodad"])
        _run([*inside, "link", "set", SANDBOX_IF, "up"])
        _run([*inside, "route", "add", "default", "via", self.gateway])
        _run([*inside, "-6", "route", "add", "default", "via", self.gateway6])
        if not self.uplink_ns:
            self._nat()

    def _nat(self) -> None:
        """Default uplink: the host routes and masquerades the sandbox's IPv4, like
        Docker's bridge. (IPv6 is configured on the link, but not forwarded: turning
        on IPv6 forwarding would stop the host accepting router advertisements.)"""
        _run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        tag = ["-m", "comment", "--comment", f"secure-proxy sandbox {self.run_id}"]
        rules = [
            [
                "-t",
                "nat",
                "POSTROUTING",
                "-s",
                f"{self.v4_prefix}.0/24",
                "!",
                "-o",
                self.peer_if,
                "-j",
                "MASQUERADE",
                *tag,
            ],
            ["-t", "filter", "FORWARD", "-i", self.peer_if, "-j", "ACCEPT", *tag],
            [
                "-t",
                "filter",
                "FORWARD",
                "-o",
                self.peer_if,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
                *tag,
            ],
        ]
        for table_flag, table, chain, *match in rules:
            _run(["iptables", "-w", table_flag, table, "-I", chain, *match])
            self.nat_rules.append(["iptables", "-w", table_flag, table, "-D", chain, *match])

    def close(self) -> None:
        for argv in self.nat_rules:
            _run(argv, check=False)
        self.nat_rules.clear()
        _delete_ns(self.ns)
        if not self.uplink_ns:
            _run(["ip", "link", "del", self.peer_if], check=False)


def _delete_ns(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "delete", ns], check=False)


def cleanup_leftovers() -> None:
    """Remove what earlier runs that were killed left behind (their creator is gone)."""
    if not REGISTRY.is_dir():
        return
    for reg in REGISTRY.glob("*.json"):
        try:
            record = json.loads(reg.read_text())
        except (OSError, ValueError):
            record = {}
        if record and _alive(record):
            continue
        for argv in record.get("undo", []):
            _run(argv, check=False)
        if record.get("ns"):
            _delete_ns(str(record["ns"]))
        stage = record.get("stage")
        if stage:
            with contextlib.suppress(OSError):
                os.rmdir(stage)
        reg.unlink(missing_ok=True)


def _inner_pid(outer: int) -> int | None:
    try:
        kids = Path(f"/proc/{outer}/task/{outer}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def preflight() -> None:
    if os.geteuid() != 0:
        raise SandboxError(
            "the sandbox engine needs root (it creates namespaces); run as root, or use "
            "--engine docker / --engine podman"
        )
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if not shutil.which(tool):
            raise SandboxError(f"the sandbox engine needs `{tool}` (util-linux / iproute2)")


def run(spec: Spec) -> int:
    """Run the sandbox to completion; the return value is the command's exit code."""
    preflight()
    cleanup_leftovers()
    spec.run_id = spec.run_id or secrets.token_hex(3)
    net = Network(spec.run_id, spec.netns)
    stage = STAGE_PARENT / f"sp-sandbox-{spec.run_id}"
    stage.mkdir(mode=0o700)
    spec.stage = str(stage)
    REGISTRY.mkdir(parents=True, exist_ok=True)
    reg = REGISTRY / f"{spec.run_id}.json"
    me = os.getpid()
    record: dict[str, object] = {
        "pid": me,
        "starttime": _starttime(me),
        "ns": net.ns,
        "stage": str(stage),
    }
    reg.write_text(json.dumps(record))
    proc: subprocess.Popen[bytes] | None = None
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        net.create()
        record["undo"] = net.nat_rules
        reg.write_text(json.dumps(record))
        python = str(Path(spec.reuse_venv) / "bin" / "python")
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": spec.source,
            "SP_SANDBOX_SPEC": spec.to_json(),
        }
        argv = [
            "nsenter",
            f"--net=/run/netns/{net.ns}",
            "--",
            "unshare",
            "--mount",
            "--pid",
            "--uts",
            "--ipc",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "--",
            python,
            "-m",
            "runtime.host.sandbox",
            "--inner",
        ]
        tty = os.isatty(0)

        def forward(signum: int, _frame: object) -> None:
            # A terminal's Ctrl-C reaches the foreground group (the command, or init
            # during startup) by itself; anything else is passed on to init.
            if signum == signal.SIGINT and tty:
                return
            if proc is not None:
                inner = _inner_pid(proc.pid)
                if inner:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(inner, signum)

        for sig in SIGNALS:
            signal.signal(sig, forward)
        proc = subprocess.Popen(argv, env=env)
        code = proc.wait()
        return 128 - code if code < 0 else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        net.close()
        with contextlib.suppress(OSError):
            stage.rmdir()
        reg.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- inside

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
MNT_DETACH = 2


def _mount(*args: str) -> None:
    _run(["mount", *args])


def _bind(source: str, target: Path, read_only: bool) -> None:
    src = Path(source)
    if src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount("--bind", source, str(target))
    if read_only:
        _mount("-o", "remount,bind,ro", str(target))


def _pivot(new_root: Path) -> None:
    os.chdir(new_root)
    if _SYS_PIVOT_ROOT is not None and _libc.syscall(_SYS_PIVOT_ROOT, b".", b".") == 0:
        if _libc.umount2(b".", MNT_DETACH) != 0:
            raise SandboxError(f"umount old root: {os.strerror(ctypes.get_errno())}")
    else:
        os.chroot(".")
    os.chdir("/")


def _hosts(add_hosts: list[tuple[str, str]]) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"127.0.1.1\t{HOSTNAME}",
    ]
    lines += [f"{ip}\t{name}" for name, ip in add_hosts]
    return "\n".join(lines) + "\n"


def build_root(spec: Spec) -> Path:
    stage = Path(spec.stage)
    _mount("-t", "tmpfs", "-o", "mode=0755", "sp-sandbox", str(stage))
    for d in ("upper", "work", "root"):
        (stage / d).mkdir()
    new = stage / "root"
    _mount(
        "-t",
        "overlay",
        "sp-sandbox-root",
        "-o",
        f"lowerdir=/,upperdir={stage}/upper,workdir={stage}/work",
        str(new),
    )
    _mount("-t", "proc", "proc", str(new / "proc"))
    _mount("--rbind", "/dev", str(new / "dev"))
    try:
        _mount("-t", "sysfs", "-o", "ro", "sysfs", str(new / "sys"))
    except SandboxError:
        _mount("--rbind", "-o", "ro", "/sys", str(new / "sys"))
    for path, mode in (("tmp", "1777"), ("run", "0755"), ("home", "0755"), ("dev/shm", "1777")):
        (new / path).mkdir(exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"mode={mode}", "sp-sandbox", str(new / path))
    # The reused venv may live on a mount the overlay (root fs only) does not show.
    venv = Path(spec.reuse_venv)
    if venv.is_dir():
        _bind(str(venv), new / venv.relative_to("/"), read_only=True)
    for m in spec.mounts:
        _bind(m.source, new / m.target.lstrip("/"), m.read_only)
    (new / "etc" / "hosts").write_text(_hosts(spec.add_hosts))
    (new / "etc" / "hostname").write_text(HOSTNAME + "\n")
    return new


def inner() -> int:
    """PID 1 of the new pid namespace: build the root, install, become init."""
    started = time.monotonic()
    spec = Spec.from_json(os.environ.pop("SP_SANDBOX_SPEC"))
    try:
        socket.sethostname(HOSTNAME)
        new = build_root(spec)
        from runtime.install import install

        install(new, Path(spec.source), reuse_venv=Path(spec.reuse_venv))
        _pivot(new)
        if spec.env.get("SECURE_PROXY_TRACE") == "1":
            elapsed = time.monotonic() - started
            print(f"[sandbox] root built and runtime installed in {elapsed:.2f}s", file=sys.stderr)
    except Exception as exc:
        print(f"[Sandbox] setup failed: {exc}", file=sys.stderr, flush=True)
        return 1
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "container": "secure-proxy-sandbox",
        **spec.env,
    }
    init = "/opt/secure-proxy/venv/bin/secure-proxy-init"
    argv = [init, "--", *spec.command]
    if spec.cap_drop:
        # As docker run --cap-drop: out of the bounding set, so init and every
        # component it starts run without them.
        drop = ",".join(f"-{c.lower()}" for c in spec.cap_drop)
        argv = ["setpriv", f"--bounding-set={drop}", "--", *argv]
        os.execvpe("setpriv", argv, env)
    os.execve(init, argv, env)
    return 127


if __name__ == "__main__":
    if sys.argv[1:] == ["--inner"]:
        sys.exit(inner())
    print(
        "usage: python -m runtime.host.sandbox --inner (started by copilot_here --engine sandbox)",
        file=sys.stderr,
    )
    sys.exit(2)
