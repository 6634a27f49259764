"""Which upstream addresses an allowed request may be connected to.

A rule allows a name, not whatever the name resolves to: a name whose DNS answer
(or hosts entry) points at 127.0.0.1, at the cloud metadata service
169.254.169.254 or into the local network would let a request "to an allowed
host" reach the container's own services, the host's or the LAN's (DNS
rebinding). The interceptor resolves the judged name once, checks every address
here and connects to a checked address itself, so a second DNS answer cannot
swap it.

REFUSED_RANGES is the list, by purpose (IANA's special-purpose registries):
loopback, unspecified, private (RFC 1918, ULA, site-local, local-use NAT64),
shared address space (100.64.0.0/10, carrier-grade NAT, where some clouds put
their metadata), link-local (the metadata address), multicast, and ranges
reserved or used for protocol assignments (240.0.0.0/4, 192.0.0.0/24 with
another cloud's metadata address, the rest of ::/8). IPv6 forms that carry an
IPv4 address -- IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4
`2002:AABB:CCDD::` -- are judged by that IPv4 address.

Kept reachable on purpose: the documentation ranges (192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) and the benchmarking range
(198.18.0.0/15). They are not routed on the internet either, so a name pointed
there reaches nothing of the box's or the host's; the end-to-end tests use them
as their internet.

Pure: text in, a verdict out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from runtime.core.policy import Action, Decision, Mode, Reason, Rule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK = "loopback"
LINK_LOCAL = "link-local"
PRIVATE = "private"
SHARED = "shared address space"
UNSPECIFIED = "unspecified"
MULTICAST = "multicast"
RESERVED = "reserved"

#: Networks never connected to unless the rule allows it, with what they are. The
#: first match names the range, so the more specific networks come first.
REFUSED_RANGES: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(network), what)
    for network, what in (
        ("0.0.0.0/8", UNSPECIFIED),  # "this network"; 0.0.0.0 reaches the box itself
        ("10.0.0.0/8", PRIVATE),
        ("100.64.0.0/10", SHARED),  # carrier-grade NAT; 100.100.100.200 is a metadata address
        ("127.0.0.0/8", LOOPBACK),
        ("169.254.0.0/16", LINK_LOCAL),  # 169.254.169.254: the cloud metadata service
        ("172.16.0.0/12", PRIVATE),
        ("192.0.0.0/24", RESERVED),  # IETF protocol assignments; 192.0.0.192 is a metadata address
        ("192.168.0.0/16", PRIVATE),
        ("224.0.0.0/4", MULTICAST),
        ("240.0.0.0/4", RESERVED),  # future use, and the broadcast address
        ("::/128", UNSPECIFIED),
        ("::1/128", LOOPBACK),
        ("64:ff9b:1::/48", PRIVATE),  # local-use NAT64
        ("::/8", RESERVED),  # IPv4-compatible and other old forms (mapped, NAT64: see below)
        ("100::/64", RESERVED),  # discard-only
        ("fc00::/7", PRIVATE),  # unique local addresses; fd00:ec2::254 is a metadata address
        ("fe80::/10", LINK_LOCAL),
        ("fec0::/10", PRIVATE),  # site-local, deprecated
        ("ff00::/8", MULTICAST),
    )
)

#: IPv6 forms that carry an IPv4 address, judged as that address.
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def parse_address(text: str) -> IPAddress:
    """An address as getaddrinfo gives it (an IPv6 zone `%eth0` allowed). Raises ValueError."""
    return ipaddress.ip_address(text.strip("[]"))


def embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """(the IPv4 address, the form) an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 IPv6
    address carries; None for any other address."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, "IPv4-mapped"
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    if address.sixtofour is not None:
        return address.sixtofour, "6to4"
    return None


def refused_range(text: str) -> str | None:
    """What `text` is when it is not an internet address (`loopback`, `private`, ...), else
    None. Text that is not an address at all is refused as reserved."""
    try:
        address = parse_address(text)
    except ValueError:
        return RESERVED
    embedded = embedded_ipv4(address)
    if embedded is not None:
        inner, form = embedded
        what = refused_range(str(inner))
        return f"{what} ({form})" if what else None
    for network, what in REFUSED_RANGES:
        if address.version == network.version and address in network:
            return what
    return None


def rule_allows_address(rule: Rule | None, text: str) -> bool:
    """Whether a request the rule matched may be connected to this address: an internet
    address always; any other only when the rule names it as its host (an IP-literal
    rule) or says `allow_private_addresses`."""
    if refused_range(text) is None:
        return True
    if rule is None:
        return False
    if rule.allow_private_addresses:
        return True
    try:
        return rule.host == str(parse_address(text))
    except ValueError:
        return False


def choose_address(decision: Decision, addresses: Sequence[str]) -> tuple[str | None, Decision]:
    """(the address to connect to, the decision that stands) for a decision that lets the
    request through and the addresses its host resolved to, in the resolver's order.

    The first address the rule allows. When there is none: enforce blocks the request
    (no address, reason private_address); monitor lets it through to the first address
    as a violation, as monitor does for every rule it would enforce. A request monitor
    lets through already (another violation) keeps its reason; allow-all checks nothing.
    """
    if not addresses or decision.blocked:
        return None, decision
    if decision.mode is Mode.ALLOW_ALL:
        return addresses[0], decision
    for address in addresses:
        if rule_allows_address(decision.rule, address):
            return address, decision
    first = addresses[0]
    if decision.violation:
        return first, decision
    if decision.mode is Mode.MONITOR:
        return first, _refused(decision, Action.VIOLATION, first)
    return None, _refused(decision, Action.BLOCK, first)


def _refused(decision: Decision, action: Action, address: str) -> Decision:
    return Decision(
        action,
        Reason.PRIVATE_ADDRESS,
        decision.mode,
        decision.host,
        decision.path,
        decision.rule,
        method=decision.method,
        address=address,
    )
