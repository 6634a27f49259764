"""The sandbox's host networking: its network namespace, the veth to its uplink,
NAT on the host, and the removal of what a killed run left behind.

Network namespaces, veths and iptables rules outlive the processes that made
them: every run records what it made in REGISTRY (with its pid and start time),
removes it at exit, and the next run removes the records of runs that are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from runtime.host.sandbox.spec import SandboxError, run_tool

NS_PREFIX = "spsbx-"
REGISTRY = Path(os.environ.get("SECURE_PROXY_SANDBOX_REGISTRY", "/run/secure-proxy-sandbox"))
SANDBOX_IF = "eth0"


def starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict[str, object]) -> bool:
    pid = int(str(record.get("pid", 0)))
    return pid > 0 and starttime(pid) == record.get("starttime")


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
        used = run_tool([*self._uplink_ip(), "-o", "addr", "show"], check=False).stdout
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
        run_tool(["ip", "netns", "add", self.ns])
        inside = ["ip", "-n", self.ns]
        sysctl = ["ip", "netns", "exec", self.ns, "sysctl", "-qw"]
        run_tool([*sysctl, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
        peer_ns = ["netns", self.uplink_ns] if self.uplink_ns else []
        run_tool(
            [
                *("ip", "link", "add", self.peer_if, *peer_ns, "type", "veth"),
                *("peer", "name", SANDBOX_IF, "netns", self.ns),
            ]
        )
        up = self._uplink_ip()
        no_dad = f"net.ipv6.conf.{self.peer_if}.accept_dad=0"
        if self.uplink_ns:
            run_tool(["ip", "netns", "exec", self.uplink_ns, "sysctl", "-qw", no_dad], check=False)
        else:
            run_tool(["sysctl", "-qw", no_dad], check=False)
        run_tool([*up, "addr", "add", f"{self.gateway}/24", "dev", self.peer_if])
        run_tool([*up, "-6", "addr", "add", f"{self.gateway6}/64", "dev", self.peer_if, "nodad"])
        run_tool([*up, "link", "set", self.peer_if, "up"])
        run_tool([*inside, "link", "set", "lo", "up"])
        run_tool([*inside, "addr", "add", f"{self.address}/24", "dev", SANDBOX_IF])
        run_tool([*inside, "-6", "addr", "add", f"{self.address6}/64", "dev", SANDBOX_IF, "nodad"])
        run_tool([*inside, "link", "set", SANDBOX_IF, "up"])
        run_tool([*inside, "route", "add", "default", "via", self.gateway])
        run_tool([*inside, "-6", "route", "add", "default", "via", self.gateway6])
        if not self.uplink_ns:
            self._nat()

    def _nat(self) -> None:
        """Default uplink: the host routes and masquerades the sandbox's IPv4, like
        Docker's bridge. (IPv6 is configured on the link, but not forwarded: turning
        on IPv6 forwarding would stop the host accepting router advertisements.)"""
        run_tool(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        tag = ["-m", "comment", "--comment", f"secure-proxy sandbox {self.run_id}"]
        subnet = f"{self.v4_prefix}.0/24"
        established = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]
        rules = [
            ["-t", "nat", "POSTROUTING", "-s", subnet, "!", "-o", self.peer_if, "-j", "MASQUERADE"],
            ["-t", "filter", "FORWARD", "-i", self.peer_if, "-j", "ACCEPT"],
            ["-t", "filter", "FORWARD", "-o", self.peer_if, *established, "-j", "ACCEPT"],
        ]
        for table_flag, table, chain, *match in rules:
            run_tool(["iptables", "-w", table_flag, table, "-I", chain, *match, *tag])
            self.nat_rules.append(["iptables", "-w", table_flag, table, "-D", chain, *match, *tag])

    def close(self) -> None:
        for argv in self.nat_rules:
            run_tool(argv, check=False)
        self.nat_rules.clear()
        delete_ns(self.ns)
        if not self.uplink_ns:
            run_tool(["ip", "link", "del", self.peer_if], check=False)


def delete_ns(ns: str) -> None:
    pids = run_tool(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    run_tool(["ip", "netns", "delete", ns], check=False)


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
            run_tool(argv, check=False)
        if record.get("ns"):
            delete_ns(str(record["ns"]))
        stage = record.get("stage")
        if stage:
            with contextlib.suppress(OSError):
                os.rmdir(stage)
        reg.unlink(missing_ok=True)
