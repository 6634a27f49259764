"""Thin adapter to the kernel's ipsets of opened ports, through the `ipset` tool.

The firewall makes the sets (ruleset.PORT_SETS: hash:ip,port, family inet / inet6, a
timeout per entry) before the rule that matches them goes in, and destroys them once
that rule is gone (the kernel refuses to destroy a set a rule still names). The port
keeper (runtime.container.portkeeper) adds entries. Sets live in the network
namespace, like the rules, so `ipset` must run inside the container's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from runtime.core.hosts import ip_literal
from runtime.core.policy import Policy

from .ruleset import PORT_SETS

FAMILY = {4: "inet", 6: "inet6"}
#: Entries the keeper adds live at least this long (a TTL-0 answer must still let the
#: client connect) and at most this long (a huge TTL must not open a port for ever).
MIN_TIMEOUT = 30
MAX_TIMEOUT = 86400


class IpsetError(Exception):
    """`ipset` is missing or failed; the message has the cause and the fix."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One address,port pair to open; timeout 0: for the set's life (an IP-literal rule)."""

    address: str
    port: int
    timeout: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    def line(self) -> str:
        """One `ipset restore` line."""
        return f"add {PORT_SETS[self.family]} {self.address},tcp:{self.port} timeout {self.timeout}"


def clamp(ttl: int) -> int:
    return max(MIN_TIMEOUT, min(MAX_TIMEOUT, int(ttl)))


def _ipset(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # supervisord's PATH may lack /usr/sbin.
    tool = shutil.which("ipset") or next(
        (p for p in ("/usr/sbin/ipset", "/sbin/ipset") if os.path.exists(p)), None
    )
    if tool is None:
        raise IpsetError(
            "the ipset tool is missing: install the Debian ipset package in the image "
            "(a rule's ports need it)"
        )
    try:
        return subprocess.run(
            [tool, *args], input=stdin, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IpsetError(f"ipset {' '.join(args)} failed: {exc}") from exc


def create(families: Iterable[int]) -> None:
    """Make the sets of these families; an existing set of the same type is kept with its
    entries (a re-apply at level full forgets nothing)."""
    for family in families:
        name = PORT_SETS[family]
        r = _ipset(
            ["create", "-exist", name, "hash:ip,port", "family", FAMILY[family], "timeout", "0"]
        )
        if r.returncode != 0:
            raise IpsetError(
                f"ipset create {name} failed ({r.stderr.strip()}): the kernel needs ip_set "
                "and ip_set_hash_ipport (modprobe them on the host), and another set of that "
                "name with another type must be destroyed first"
            )


def destroy(families: Iterable[int]) -> None:
    """Destroy the sets of these families that exist (after the rule naming them is gone)."""
    for family in families:
        name = PORT_SETS[family]
        if _ipset(["list", "-name", name]).returncode != 0:
            continue  # absent: nothing to do
        r = _ipset(["destroy", name])
        if r.returncode != 0:
            raise IpsetError(f"ipset destroy {name} failed: {r.stderr.strip()}")


def exists(family: int) -> bool:
    return _ipset(["list", "-name", PORT_SETS[family]]).returncode == 0


def add(entries: Iterable[Entry]) -> None:
    """Add (or refresh the timeout of) every entry, in one `ipset restore`."""
    lines = [entry.line() for entry in entries]
    if not lines:
        return
    r = _ipset(["restore", "-exist"], "\n".join(lines) + "\n")
    if r.returncode != 0:
        raise IpsetError(f"ipset restore failed: {r.stderr.strip()}")


def flush(families: Iterable[int]) -> None:
    """Empty the sets (a new policy: what the old one opened is forgotten)."""
    for family in families:
        r = _ipset(["flush", PORT_SETS[family]])
        if r.returncode != 0:
            raise IpsetError(f"ipset flush {PORT_SETS[family]} failed: {r.stderr.strip()}")


def literal_entries(policy: Policy) -> list[Entry]:
    """Entries for the rules whose host is an IP literal: their ports to that address,
    without a timeout (for the run). The firewall adds them at apply, the port keeper
    again after a reload forgot everything."""
    out: list[Entry] = []
    for rule in policy.rules:
        if rule.ports and ip_literal(rule.host) is not None:
            address = ip_literal(rule.host) or rule.host  # canonical, as answers are
            out += [Entry(address, port, 0) for port in sorted(rule.ports)]
    return out
