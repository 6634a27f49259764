"""The intended rule set, as plain data. Pure: no iptables, no I/O besides parsing text.

How much the firewall does follows from the compiled policy (level.lock_level):

    none       rules disabled, no log: no rule of ours at all (the network untouched)
    intercept  rules disabled, log on: everyone's TCP 80/443 but proxy-user's goes to
               the interceptor (nat OUTPUT only); everything else untouched
    full       rules enabled: the lock (filter OUTPUT and INPUT, nat OUTPUT) and,
               with a DNS guard port, every user's DNS to the DNS guard

build_ruleset(proxy_uid, port, nameservers, dns_port, level, workers) returns, for IPv4 and
IPv6, the rules of our own chains the level needs, plus the one jump from the
built-in chain into each; every other chain of ours (OUR_CHAINS) must be absent.
Every Rule renders to the exact argument string iptables-save prints for it, which
is both what `status` shows and what verification compares after reading back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .level import LockLevel as LockLevel
from .level import lock_level as lock_level  # re-exported: the level and its rules together

FILTER_CHAIN = "SECURE_PROXY_OUT"
INBOUND_CHAIN = "SECURE_PROXY_IN"
NAT_CHAIN = "SECURE_PROXY_NAT"
OUTPUT = "OUTPUT"
INPUT = "INPUT"
# Backstop behind our chains: if a jump were ever removed, OUTPUT and INPUT drop.
FILTER_OUTPUT_POLICY = "DROP"
FILTER_INPUT_POLICY = "DROP"

# The policy a built-in chain is given back when our chain leaves and nothing else
# was recorded before we changed it (a fresh network namespace's).
DEFAULT_HOOK_POLICY = "ACCEPT"

DIRECT_PORTS = (80, 443)
#: Kernel ipsets (hash:ip,port, a timeout per entry) of the address,port pairs a rule's
#: `ports` opened (runtime.container.portkeeper fills them from the DNS guard's answers).
#: Per network namespace, like the rules; made by apply at level full, destroyed by remove.
PORT_SETS = {4: "sp_ports4", 6: "sp_ports6"}
DNS_PORT = 53
QUIC_PORT = 443
# Neighbour discovery: without it no IPv6 packet (proxy-user's, DNS) ever leaves.
# Out: 133 router solicitation, 135 neighbour solicitation, 136 neighbour advertisement.
# In: 134 router advertisement, 135, 136.
NDP_TYPES = (133, 135, 136)
NDP_TYPES_IN = (134, 135, 136)


@dataclass(frozen=True)
class ChainRef:
    """One chain of ours and the built-in chain that jumps to it."""

    table: str
    chain: str
    hook: str
    sets_policy: bool  # we set the hook's policy (DROP) while the chain is ours


OUR_CHAINS = (
    ChainRef("filter", FILTER_CHAIN, OUTPUT, True),
    ChainRef("filter", INBOUND_CHAIN, INPUT, True),
    ChainRef("nat", NAT_CHAIN, OUTPUT, False),
)


@dataclass(frozen=True)
class Opt:
    """One option of a match or target: `[!] --name value`."""

    name: str
    value: str
    negated: bool = False

    def render(self) -> str:
        neg = "! " if self.negated else ""
        return f"{neg}--{self.name} {self.value}"


@dataclass(frozen=True)
class Match:
    name: str
    opts: tuple[Opt, ...] = ()

    def render(self) -> str:
        return " ".join([f"-m {self.name}", *(o.render() for o in self.opts)])


@dataclass(frozen=True)
class Rule:
    """One rule in the fields iptables-save prints, in its order."""

    target: str
    src: str | None = None
    dst: str | None = None  # CIDR, e.g. 198.18.0.1/32
    in_iface: str | None = None
    out_iface: str | None = None
    proto: str | None = None  # tcp, udp, icmp, ipv6-icmp
    matches: tuple[Match, ...] = ()
    target_opts: tuple[Opt, ...] = ()

    def render(self) -> str:
        parts: list[str] = []
        if self.src:
            parts.append(f"-s {self.src}")
        if self.dst:
            parts.append(f"-d {self.dst}")
        if self.in_iface:
            parts.append(f"-i {self.in_iface}")
        if self.out_iface:
            parts.append(f"-o {self.out_iface}")
        if self.proto:
            parts.append(f"-p {self.proto}")
        parts += [m.render() for m in self.matches]
        parts.append(f"-j {self.target}")
        parts += [o.render() for o in self.target_opts]
        return " ".join(parts)


@dataclass(frozen=True)
class TableSpec:
    """Our chain in one table, and how the built-in chain it hangs off must look at it."""

    table: str  # "filter" or "nat"
    chain: str
    rules: tuple[Rule, ...]
    hook_policy: str | None = None  # None: leave the built-in policy alone
    hook: str = OUTPUT  # the built-in chain that jumps to ours

    @property
    def jump(self) -> Rule:
        return Rule(target=self.chain)

    def save_lines(self) -> list[str]:
        """Our part of this table in iptables-save form (without the `*table` line)."""
        lines = []
        if self.hook_policy:
            lines.append(f":{self.hook} {self.hook_policy}")
        lines.append(f":{self.chain} -")
        lines.append(f"-A {self.hook} {self.jump.render()}")
        lines += [f"-A {self.chain} {r.render()}" for r in self.rules]
        return lines


@dataclass(frozen=True)
class FamilySpec:
    family: int  # 4 or 6
    tables: tuple[TableSpec, ...]

    @property
    def absent(self) -> tuple[ChainRef, ...]:
        """Our chains this level does not use: removed by apply, checked by verify."""
        present = {(t.table, t.chain) for t in self.tables}
        return tuple(c for c in OUR_CHAINS if (c.table, c.chain) not in present)

    def save_text(self) -> str:
        lines: list[str] = []
        for name in dict.fromkeys(t.table for t in self.tables):
            lines.append(f"*{name}")
            for t in self.tables:
                if t.table == name:
                    lines += t.save_lines()
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Ruleset:
    proxy_uid: int
    port: int
    nameservers: tuple[str, ...]
    families: tuple[FamilySpec, ...] = field(default_factory=tuple)
    level: LockLevel = LockLevel.FULL
    dns_port: int | None = None
    workers: int = 1  # interceptor processes, on port .. port + workers - 1

    def family(self, version: int) -> FamilySpec:
        return next(f for f in self.families if f.family == version)


def _tcp(port: int) -> Match:
    return Match("tcp", (Opt("dport", str(port)),))


def _tcp_ports(first: int, count: int) -> Match:
    """`--dport first` or, for several, the range `--dport first:last`."""
    return Match(
        "tcp", (Opt("dport", str(first) if count == 1 else f"{first}:{first + count - 1}"),)
    )


def _udp(port: int) -> Match:
    return Match("udp", (Opt("dport", str(port)),))


def _owner(uid: int, negated: bool = False) -> Match:
    return Match("owner", (Opt("uid-owner", str(uid), negated),))


def _conntrack(states: str, direction: str | None = None) -> Match:
    opts = [Opt("ctstate", states)]
    if direction:
        opts.append(Opt("ctdir", direction))
    return Match("conntrack", tuple(opts))


def _reject(with_: str) -> tuple[Opt, ...]:
    return (Opt("reject-with", with_),)


def split_nameservers(nameservers: Iterable[str]) -> tuple[list[str], list[str]]:
    """Non-loopback nameservers by family, deduplicated, order kept.

    Loopback resolvers (127.0.0.11 of Docker, 127.0.0.53, ::1) are covered by the
    loopback rule. Zone ids (fe80::1%eth0) are dropped: iptables cannot match them.
    """
    v4: list[str] = []
    v6: list[str] = []
    for raw in nameservers:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            continue
        bucket = v4 if ip.version == 4 else v6
        if str(ip) not in bucket:
            bucket.append(str(ip))
    return v4, v6


def _nth(every: int) -> Match:
    return Match("statistic", (Opt("mode", "nth"), Opt("every", str(every)), Opt("packet", "0")))


def _nat_redirects(proxy_uid: int, port: int, workers: int = 1) -> list[Rule]:
    """Everyone's TCP 80/443 but proxy-user's to the interceptor; local traffic stays
    local (a dev server on localhost:80 is not intercepted).

    With N worker processes (ports port .. port+N-1) new connections are spread in
    turn: the rule for worker i takes every (N-i)-th connection that reaches it, the
    last worker's takes the rest. nat sees only a connection's first packet, so a
    connection stays with one worker; plain `--to-ports a-b` would not spread (the
    kernel keeps the range's first port whenever the tuple is unique)."""
    rules = [Rule("RETURN", out_iface="lo")]
    for p in DIRECT_PORTS:
        for i in range(workers):
            spread = (_nth(workers - i),) if i < workers - 1 else ()
            rules.append(
                Rule(
                    "REDIRECT",
                    proto="tcp",
                    matches=(_tcp(p), _owner(proxy_uid, negated=True), *spread),
                    target_opts=(Opt("to-ports", str(port + i)),),
                )
            )
    return rules


def _intercept_spec(family: int, proxy_uid: int, port: int, workers: int = 1) -> FamilySpec:
    nat = TableSpec("nat", NAT_CHAIN, tuple(_nat_redirects(proxy_uid, port, workers)))
    return FamilySpec(family, (nat,))


def _family_spec(
    family: int,
    proxy_uid: int,
    port: int,
    nameservers: Sequence[str],
    dns_port: int | None = None,
    workers: int = 1,
) -> FamilySpec:
    v6 = family == 6
    host_len = 128 if v6 else 32
    loopback = "::1/128" if v6 else "127.0.0.1/32"
    port_unreach = "icmp6-port-unreachable" if v6 else "icmp-port-unreachable"
    filter_rules: list[Rule] = []
    if dns_port is not None:
        # A user's UDP DNS still aimed at port 53 here escaped the REDIRECT: NAT is
        # decided on a flow's first packet only, and a query sent from the source port
        # of one the guard just forwarded (same resolver) belongs to the guard's
        # conntrack entry. The ESTABLISHED rule below would carry it to the resolver
        # unjudged, so it is refused first (before the loopback rule too: the guard
        # may forward to a loopback resolver). TCP cannot hit this: a SYN on an old
        # entry starts a new flow, which is redirected.
        filter_rules.append(
            Rule(
                "REJECT",
                proto="udp",
                matches=(_udp(DNS_PORT), _owner(proxy_uid, negated=True)),
                target_opts=_reject(port_unreach),
            )
        )
        # A user's UDP *from* port 53. Where the resolver's address is local (Docker's
        # 127.0.0.11, its port 53 DNATed to the real one, and any user may bind a port
        # below 1024 there), the agent binds it and sends to each port the guard asks
        # from: conntrack then takes the guard's queries for replies on the agent's
        # flows, so they reach the agent (no DNAT), which answers them with the
        # addresses it likes, and the port keeper opens a rule's ports to those. (TCP
        # cannot be taken so: a SYN never joins a flow another socket started.)
        filter_rules.append(
            Rule(
                "REJECT",
                proto="udp",
                matches=(
                    Match("udp", (Opt("sport", str(DNS_PORT)),)),
                    _owner(proxy_uid, negated=True),
                ),
                target_opts=_reject(port_unreach),
            )
        )
    filter_rules += [
        Rule("ACCEPT", out_iface="lo"),
        # Traffic REDIRECTed to the interceptor. The loopback rule does not catch it:
        # filter OUTPUT still sees the *original* output interface (the route looked
        # up before nat OUTPUT rewrote the destination), only the new destination.
        # With N workers: their ports port..port+N-1 (a --dport range).
        Rule("ACCEPT", dst=loopback, proto="tcp", matches=(_tcp_ports(port, workers),)),
        # Only connections the box opened (their packets go out in the ORIGINAL
        # direction): replies on a connection accepted from outside never leave.
        Rule("ACCEPT", matches=(_conntrack("RELATED,ESTABLISHED", "ORIGINAL"),)),
    ]
    if v6:
        filter_rules += [
            Rule(
                "ACCEPT",
                proto="ipv6-icmp",
                matches=(Match("icmp6", (Opt("icmpv6-type", str(t)),)),),
            )
            for t in NDP_TYPES
        ]
    # Only the proxy-user's own sockets may leave directly, on TCP 80/443 only.
    filter_rules += [
        Rule("ACCEPT", proto="tcp", matches=(_tcp(p), _owner(proxy_uid))) for p in DIRECT_PORTS
    ]
    if dns_port is not None:
        # DNS REDIRECTed to the DNS guard (like the interceptor's port above).
        filter_rules += [
            Rule("ACCEPT", dst=loopback, proto=proto, matches=(match,))
            for proto, match in (("udp", _udp(dns_port)), ("tcp", _tcp(dns_port)))
        ]
    # With the DNS guard only proxy-user (the guard) reaches the real resolvers.
    resolver_owner = (_owner(proxy_uid),) if dns_port is not None else ()
    for ns in nameservers:
        for proto, match in (("udp", _udp(DNS_PORT)), ("tcp", _tcp(DNS_PORT))):
            filter_rules.append(
                Rule(
                    "ACCEPT",
                    dst=f"{ns}/{host_len}",
                    proto=proto,
                    matches=(match, *resolver_owner),
                )
            )
    # A rule's `ports`: TCP to an address,port the port keeper put in the set (any user:
    # these are the agent's connections), until its entry times out.
    filter_rules.append(
        Rule(
            "ACCEPT",
            proto="tcp",
            matches=(Match("set", (Opt("match-set", f"{PORT_SETS[family]} dst,dst"),)),),
        )
    )
    prohibited = "icmp6-adm-prohibited" if v6 else "icmp-admin-prohibited"
    filter_rules += [
        # QUIC: fail at once so clients fall back to TCP (and so to the interceptor).
        Rule("REJECT", proto="udp", matches=(_udp(QUIC_PORT),), target_opts=_reject(port_unreach)),
        Rule("REJECT", proto="tcp", target_opts=_reject("tcp-reset")),
        Rule("REJECT", target_opts=_reject(prohibited)),
    ]
    icmp = "ipv6-icmp" if v6 else "icmp"
    inbound_rules: list[Rule] = [
        Rule("ACCEPT", in_iface="lo"),
        # Replies on connections the box opened; nothing that starts outside.
        Rule("ACCEPT", matches=(_conntrack("ESTABLISHED", "REPLY"),)),
        # ICMP errors about those connections (path MTU, unreachable).
        Rule("ACCEPT", proto=icmp, matches=(_conntrack("RELATED"),)),
    ]
    if v6:
        inbound_rules += [
            Rule(
                "ACCEPT",
                proto="ipv6-icmp",
                matches=(Match("icmp6", (Opt("icmpv6-type", str(t)),)),),
            )
            for t in NDP_TYPES_IN
        ]
    inbound_rules.append(Rule("DROP"))
    nat_rules: list[Rule] = []
    if dns_port is not None:
        # Every DNS packet but the guard's own goes to the guard, loopback resolvers
        # (Docker's 127.0.0.11) included: so these come before the loopback RETURN.
        nat_rules += [
            Rule(
                "REDIRECT",
                proto=proto,
                matches=(match, _owner(proxy_uid, negated=True)),
                target_opts=(Opt("to-ports", str(dns_port)),),
            )
            for proto, match in (("udp", _udp(DNS_PORT)), ("tcp", _tcp(DNS_PORT)))
        ]
    nat_rules += _nat_redirects(proxy_uid, port, workers)
    return FamilySpec(
        family=family,
        tables=(
            TableSpec("filter", FILTER_CHAIN, tuple(filter_rules), FILTER_OUTPUT_POLICY),
            TableSpec("filter", INBOUND_CHAIN, tuple(inbound_rules), FILTER_INPUT_POLICY, INPUT),
            TableSpec("nat", NAT_CHAIN, tuple(nat_rules)),
        ),
    )


def build_ruleset(
    proxy_uid: int,
    port: int,
    nameservers: Iterable[str],
    dns_port: int | None = None,
    level: LockLevel = LockLevel.FULL,
    workers: int = 1,
) -> Ruleset:
    """The complete intended state for IPv4 and IPv6 at `level`.

    dns_port: where the DNS guard listens (full level only); None leaves DNS to the
    resolvers open to every user (no guard). workers: the interceptor's processes, on
    ports port .. port+workers-1, new connections spread over them.
    """
    if isinstance(proxy_uid, bool) or not isinstance(proxy_uid, int) or proxy_uid < 0:
        raise ValueError(f"proxy uid must be a non-negative integer, got {proxy_uid!r}")
    if proxy_uid == 0:
        raise ValueError("proxy-user must not be root: root's traffic would bypass the lock")
    for value in (port, dns_port):
        if value is not None and not 1 <= value <= 65535:
            raise ValueError(f"port must be 1-65535, got {value}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if port + workers - 1 > 65535:
        raise ValueError(f"{workers} workers from port {port} run past port 65535")
    if dns_port is not None and port <= dns_port < port + workers:
        raise ValueError(
            f"the DNS guard port must differ from the interceptor's ({port}..{port + workers - 1})"
        )
    ns_list = list(nameservers)
    v4, v6 = split_nameservers(ns_list)
    if level is LockLevel.FULL:
        families = (
            _family_spec(4, proxy_uid, port, v4, dns_port, workers),
            _family_spec(6, proxy_uid, port, v6, dns_port, workers),
        )
    elif level is LockLevel.INTERCEPT:
        families = (
            _intercept_spec(4, proxy_uid, port, workers),
            _intercept_spec(6, proxy_uid, port, workers),
        )
        dns_port = None
    else:
        families = (FamilySpec(4, ()), FamilySpec(6, ()))
        dns_port = None
    return Ruleset(
        proxy_uid=proxy_uid,
        port=port,
        nameservers=tuple(ns_list),
        families=families,
        level=level,
        dns_port=dns_port,
        workers=workers,
    )


def parse_resolv_conf(text: str) -> list[str]:
    """Nameserver addresses from resolv.conf text; malformed entries are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            out.append(fields[1])
    return out
