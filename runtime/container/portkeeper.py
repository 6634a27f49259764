"""secure-proxy-portkeeper: opens a rule's `ports` to the addresses the DNS guard answered.

A rule may name TCP ports beyond HTTP (`{"host": "github.com", "ports": [22]}`). The
firewall accepts TCP to an address,port pair of the kernel ipsets sp_ports4/sp_ports6
(firewall.ruleset.PORT_SETS) and refuses every other one. This root program is the
only one that fills them: the DNS guard (proxy-user, without NET_ADMIN, because it
parses the agent's packets) tells it, over a Unix socket only proxy-user can write,
which addresses it is about to answer for a name, and for how long:

    guard -> keeper   {"name": "github.com", "addresses": ["140.82.112.3"], "ttl": 60}
    keeper -> guard   {"opened": ["140.82.112.3:22"]}   or   {"error": "..."}

The keeper trusts the message for the name and the addresses only: which ports the
name may have comes from its own copy of the compiled policy (Policy.ports_for), and an
address off the internet (loopback, private, link-local, ...) is opened only when the
rule allows it (runtime.core.addresses, as for HTTP). Each entry lives for the answer's
TTL, clamped to firewall.ipset.MIN_TIMEOUT..MAX_TIMEOUT. A rule whose host is an IP
literal opens its ports to that address for the whole run (no timeout), at start and
after every reload; a reload (SIGHUP) first forgets everything the old policy opened.

It runs whenever the firewall is at level full; with no ports rule it opens nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from loguru import logger

from firewall import ipset
from firewall.cli import resolve_uid
from firewall.iptables import FirewallError, ipv6_available
from runtime.core.addresses import parse_address, rule_allows_address
from runtime.core.hosts import HostError, normalize_host
from runtime.core.policy import Policy

MAX_MESSAGE = 65536
#: How many addresses one message may name (a DNS answer rarely has more than a few).
MAX_ADDRESSES = 64


def entries_for(
    policy: Policy, name: str, addresses: Iterable[str], ttl: int
) -> tuple[list[ipset.Entry], list[str]]:
    """(the entries to add, the addresses refused and why) for one answer.

    Pure but for the policy: the ports are the policy's, never the message's."""
    try:
        host = normalize_host(name)
    except HostError:
        return [], [f"{name!r} is not a host name"]
    ports = policy.ports_for(host)
    if not ports:
        return [], [f"no rule opens a port for {host}"]
    rules = policy.port_rules_for_host(host)
    timeout = ipset.clamp(ttl)
    # An IP-literal rule's entries are for the run: re-adding one with a timeout would
    # make it expire (`ipset add -exist` refreshes the timeout), so answers leave them be.
    for_the_run = {(e.address, e.port) for e in ipset.literal_entries(policy)}
    entries: list[ipset.Entry] = []
    refused: list[str] = []
    for text in list(addresses)[:MAX_ADDRESSES]:
        try:
            address = str(parse_address(str(text)))
        except ValueError:
            refused.append(f"{text!r}: not an address")
            continue
        if ":" in address and (mapped := parse_address(address).ipv4_mapped) is not None:
            address = str(mapped)
        if not any(rule_allows_address(rule, address) for rule in rules):
            refused.append(f"{address}: off the internet and no rule allows private addresses")
            continue
        entries += [
            ipset.Entry(address, port, timeout)
            for port in sorted(ports)
            if (address, port) not in for_the_run
        ]
    return entries, refused


def endpoint(entry: ipset.Entry) -> str:
    return (
        f"[{entry.address}]:{entry.port}"
        if ":" in entry.address
        else (f"{entry.address}:{entry.port}")
    )


class Keeper:
    """Answers one message; `add` is firewall.ipset.add (a fake in unit tests)."""

    def __init__(
        self, policy: Policy, add: Callable[[Iterable[ipset.Entry]], None] = ipset.add
    ) -> None:
        self.policy = policy
        self.add = add

    def handle(self, data: bytes) -> dict[str, Any]:
        try:
            message = json.loads(data)
            name = str(message["name"])
            addresses = [str(a) for a in message["addresses"]]
            ttl = int(message.get("ttl", 0))
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": f"bad message ({exc})"}
        entries, refused = entries_for(self.policy, name, addresses, ttl)
        for why in refused:
            logger.warning("not opened for {}: {}", name, why)
        try:
            self.add(entries)
        except ipset.IpsetError as exc:
            logger.error("{}: the connections to {} will be refused (fail closed)", exc, name)
            return {"error": str(exc)}
        opened = [endpoint(e) for e in entries]
        if opened:
            logger.info("opened for {} ({} s): {}", name, entries[0].timeout, ", ".join(opened))
        return {"opened": opened}


def families() -> list[int]:
    return [4, 6] if ipv6_available() else [4]


def reset(policy: Policy) -> None:
    """Forget what an earlier policy opened; open the IP-literal rules' ports."""
    fams = [f for f in families() if ipset.exists(f)]
    ipset.flush(fams)
    literal = [e for e in ipset.literal_entries(policy) if e.family in fams]
    ipset.add(literal)
    if literal:
        logger.info("opened for the run: {}", ", ".join(endpoint(e) for e in literal))


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def bind(path: Path, owner: int) -> socket.socket:
    """The listening socket: proxy-user's, 0600, in a directory of root's."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(path.parent, 0, 0)
    os.chmod(path.parent, 0o755)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chown(path, owner, -1)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def serve(keeper: Keeper, sock: socket.socket, allowed_uids: set[int], stop: Callable[[], bool]):
    sock.settimeout(0.5)  # to notice a stop or a reload between connections
    while not stop():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(2)
            try:
                uid = peer_uid(conn)
                if uid not in allowed_uids:
                    logger.warning("refused a message from uid {}", uid)
                    continue
                data = conn.recv(MAX_MESSAGE)
                conn.send(json.dumps(keeper.handle(data)).encode())
            except OSError as exc:
                logger.warning("a message was lost: {}", exc)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from runtime import fsutil, paths
    from runtime.policyfile import read_policy

    ap = argparse.ArgumentParser(prog="secure-proxy-portkeeper", description=__doc__.split("\n")[0])
    ap.add_argument("--policy", type=Path, default=paths.policy_file())
    ap.add_argument("--socket", type=Path, default=paths.portkeeper_socket())
    ap.add_argument("--ready-marker", type=Path, default=paths.portkeeper_marker())
    ap.add_argument("--proxy-user", default=paths.PROXY_USER, help="name or numeric uid")
    args = ap.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("SECURE_PROXY_LOG_LEVEL", "INFO"))
    try:
        uid = resolve_uid(str(args.proxy_user))
        keeper = Keeper(read_policy(args.policy))
        reset(keeper.policy)
        sock = bind(args.socket, uid)
    except (OSError, ValueError, KeyError, TypeError, ipset.IpsetError, FirewallError) as exc:
        logger.error("cannot start: {}; no port of a rule opens (fail closed)", exc)
        return 2
    flags = {"stop": False, "reload": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGHUP, lambda *_: flags.update(reload=True))

    def stop() -> bool:
        if flags["reload"]:
            flags["reload"] = False
            try:
                policy = read_policy(args.policy)
                reset(policy)
                keeper.policy = policy
                count = sum(bool(r.ports) for r in policy.rules)
                logger.info("policy reloaded: {} rule(s) with ports", count)
            except (OSError, ValueError, KeyError, TypeError, ipset.IpsetError) as exc:
                logger.error("policy reload: {} ({}); keeping the policy", args.policy, exc)
        return flags["stop"]

    info = {"pid": os.getpid(), "socket": str(args.socket)}
    fsutil.atomic_write(args.ready_marker, json.dumps(info) + "\n", 0o644)
    logger.info("port keeper ready on {}", args.socket)
    serve(keeper, sock, {uid, 0}, stop)
    with contextlib.suppress(OSError):
        args.socket.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
