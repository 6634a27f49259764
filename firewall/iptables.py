"""Thin adapter between the pure rule set and the kernel, through python-iptables.

python-iptables talks to the kernel with libiptc, i.e. *legacy* iptables: its rules
show in `iptables-legacy-save`, not in the nft-backed `iptables-save`.

apply() touches only our chains and the one jump into each from the built-in chain it
hangs off (filter OUTPUT and INPUT, nat OUTPUT), plus the filter OUTPUT and INPUT
policies, the backstop. Our chains the rule set's level does not use are removed,
with their jumps, and the policies we had set are given back. Each table is changed
in a single commit. read_state()/verify() read the tables back and compare them with
the intent (absent chains included).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import ipaddress
import multiprocessing
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from . import ipset
from .ruleset import (
    DEFAULT_HOOK_POLICY,
    OUR_CHAINS,
    ChainRef,
    FamilySpec,
    LockLevel,
    Match,
    Opt,
    Rule,
    Ruleset,
    TableSpec,
)

#: (family, built-in chain) -> the policy it had before we first changed it
HookPolicies = dict[tuple[int, str], str]

T = TypeVar("T")

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

CAPS_FIX = "iptables needs NET_ADMIN and NET_RAW: run the container with --cap-add=NET_ADMIN"
# Podman, unlike Docker, does not grant NET_RAW by default.
CAPS_FIX_RAW = CAPS_FIX + " --cap-add=NET_RAW"


class FirewallError(Exception):
    """A failure with one line of cause and fix, meant for the user."""


# ----------------------------------------------------------------------- preflight


def effective_caps(status_text: str | None = None) -> int:
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_capabilities(status_text: str | None = None) -> None:
    caps = effective_caps(status_text)
    has_admin = bool(caps & (1 << CAP_NET_ADMIN))
    has_raw = bool(caps & (1 << CAP_NET_RAW))
    if has_admin and has_raw:
        return
    if not has_raw:
        raise FirewallError(CAPS_FIX_RAW)
    raise FirewallError(CAPS_FIX)


def ipv6_available() -> bool:
    """False only when the kernel has no IPv6 at all (then there is nothing to lock)."""
    return Path("/proc/net/if_inet6").exists()


def _iptc() -> Any:
    """python-iptables, imported once per process (in_child imports it before forking,
    so the helpers inherit it instead of paying the import each).

    Its import looks up libc, libip4tc, libip6tc, libxtables and its own libxtwrapper
    with ctypes.util.find_library, which runs `ldconfig -p` for every lookup and gcc
    and ld for a miss (libxtwrapper is a miss: it lives in site-packages): ~25
    processes, 0.2-0.8 s. Here each name is looked up once, and IPTABLES_LIBDIR (its
    own setting for where libraries are) names site-packages, so libxtwrapper is
    opened by path. It also tries distutils (deprecated; in a venv with setuptools,
    its shim imports pkg_resources: ~0.1 s) for site-packages' path before falling
    back to sysconfig: it gets the fallback at once."""
    if "iptc" in sys.modules:
        return sys.modules["iptc"]
    original = ctypes.util.find_library
    saved_libdir = os.environ.get("IPTABLES_LIBDIR")
    ctypes.util.find_library = functools.cache(original)
    if saved_libdir is None:
        os.environ["IPTABLES_LIBDIR"] = sysconfig.get_path("platlib")
    blocked = [name for name in ("distutils", "distutils.sysconfig") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError
    try:
        import iptc
    except Exception as exc:  # ImportError, XTablesError when libxtables is missing
        raise FirewallError(
            f"python-iptables cannot load ({exc}): install the iptables package "
            "(libxtables, libip4tc, libip6tc) in the image"
        ) from exc
    finally:
        for name in blocked:
            del sys.modules[name]
        ctypes.util.find_library = original
        if saved_libdir is None:
            os.environ.pop("IPTABLES_LIBDIR", None)
    return iptc


def _table(family: int, name: str) -> Any:
    iptc = _iptc()
    try:
        if family == 4:
            return iptc.Table(name, autocommit=False)
        return iptc.Table6(name, autocommit=False)
    except iptc.IPTCError as exc:
        raise _explain(exc, family, name) from exc


def _explain(exc: Exception, family: int, table: str) -> FirewallError:
    msg = str(exc)
    low = msg.lower()
    tool = "iptables" if family == 4 else "ip6tables"
    if "permission denied" in low or "not permitted" in low:
        return FirewallError(CAPS_FIX_RAW)
    if "does not exist" in low or "insmod" in low or "protocol not supported" in low:
        module = "ip_tables" if family == 4 else "ip6_tables"
        return FirewallError(
            f"this kernel has no legacy {tool} (table {table}: {msg.strip()}): "
            f"load the {module} and iptable_{table} modules on the host (modprobe)"
        )
    return FirewallError(f"{tool} {table} table failed: {msg.strip()}")


# ----------------------------------------------------------------------- conversion

_PROTO_OUT = {"ipv6-icmp": "icmpv6"}
_PROTO_IN = {"icmpv6": "ipv6-icmp", "58": "ipv6-icmp", "6": "tcp", "17": "udp", "1": "icmp"}


def _opt_name(name: str) -> str:
    return name.replace("-", "_")


def to_iptc(rule: Rule, family: int) -> Any:
    iptc = _iptc()
    r = iptc.Rule() if family == 4 else iptc.Rule6()
    if rule.src:
        r.src = rule.src
    if rule.dst:
        r.dst = rule.dst
    if rule.in_iface:
        r.in_interface = rule.in_iface
    if rule.out_iface:
        r.out_interface = rule.out_iface
    if rule.proto:
        r.protocol = _PROTO_OUT.get(rule.proto, rule.proto)
    for m in rule.matches:
        match = r.create_match(m.name)
        for o in m.opts:
            if " " in o.value:  # several arguments (`--match-set NAME dst,dst`): a list
                setattr(match, _opt_name(o.name), ["!"] * o.negated + o.value.split(" "))
            else:
                setattr(match, _opt_name(o.name), ("!" if o.negated else "") + o.value)
    r.target = iptc.Target(r, rule.target)
    for o in rule.target_opts:
        setattr(r.target, _opt_name(o.name), o.value)
    return r


def _norm_addr(addr: str | None) -> str | None:
    if not addr:
        return None
    neg = addr.startswith("!")
    addr = addr.lstrip("!")
    host, _, mask = addr.partition("/")
    ip = ipaddress.ip_address(host)
    if mask and not mask.isdigit():
        plen = bin(int(ipaddress.ip_address(mask))).count("1")
    else:
        plen = int(mask) if mask else ip.max_prefixlen
    if plen == 0 and int(ip) == 0:
        return None
    return ("!" if neg else "") + str(ipaddress.ip_network(f"{ip}/{plen}", strict=False))


def _opts(params: dict[str, list[str]]) -> tuple[Opt, ...]:
    out = []
    for name, values in params.items():
        vals = list(values)
        negated = bool(vals) and vals[0] == "!"
        if negated:
            vals = vals[1:]
        out.append(Opt(name, " ".join(vals), negated))
    return tuple(out)


def from_iptc(r: Any) -> Rule:
    proto = r.protocol
    proto = None if proto in (None, "ip", "all", "0") else _PROTO_IN.get(proto, proto)
    return Rule(
        target=r.target.name if r.target is not None else "",
        src=_norm_addr(r.src),
        dst=_norm_addr(r.dst),
        in_iface=r.in_interface or None,
        out_iface=r.out_interface or None,
        proto=proto,
        matches=tuple(Match(m.name, _opts(m.get_all_parameters())) for m in r.matches),
        target_opts=_opts(r.target.get_all_parameters()) if r.target is not None else (),
    )


# ----------------------------------------------------------------------- apply


def apply_table(family: int, specs: list[TableSpec]) -> None:
    """Replace our chains and their jumps in one table, in one commit."""
    iptc = _iptc()
    name = specs[0].table
    table = _table(family, name)
    try:
        table.autocommit = False
        table.refresh()
        for spec in specs:
            if table.is_chain(spec.chain):
                chain = iptc.Chain(table, spec.chain)
                chain.flush()
            else:
                chain = table.create_chain(spec.chain)
            for rule in spec.rules:
                chain.append_rule(to_iptc(rule, family))
            hook = iptc.Chain(table, spec.hook)
            for existing in list(hook.rules):
                if existing.target is not None and existing.target.name == spec.chain:
                    hook.delete_rule(existing)
            hook.insert_rule(to_iptc(spec.jump, family))
            if spec.hook_policy:
                hook.set_policy(spec.hook_policy)
        table.commit()
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        # Throw away the uncommitted batch so a later caller starts clean.
        with contextlib.suppress(iptc.IPTCError):
            table.refresh()
        raise _explain(exc, family, name) from exc
    finally:
        table.autocommit = True
    logger.debug("applied {} {} ({} rules)", _tool(family), name, sum(len(s.rules) for s in specs))


def remove_chains(family: int, refs: list[ChainRef], policies: HookPolicies) -> None:
    """Delete our chains (in one table) and every jump to them; where one was there,
    give its hook the policy recorded before we changed it (else ACCEPT)."""
    iptc = _iptc()
    name = refs[0].table
    table = _table(family, name)
    try:
        table.autocommit = False
        table.refresh()
        for ref in refs:
            hook = iptc.Chain(table, ref.hook)
            jumps = [r for r in hook.rules if r.target is not None and r.target.name == ref.chain]
            ours = table.is_chain(ref.chain)
            for jump in jumps:
                hook.delete_rule(jump)
            if ours:
                chain = iptc.Chain(table, ref.chain)
                chain.flush()
                chain.delete()
            if ref.sets_policy and (ours or jumps):
                hook.set_policy(policies.get((family, ref.hook), DEFAULT_HOOK_POLICY))
        table.commit()
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        with contextlib.suppress(iptc.IPTCError):
            table.refresh()
        raise _explain(exc, family, name) from exc
    finally:
        table.autocommit = True
    logger.debug("removed {} {}: {}", _tool(family), name, ", ".join(r.chain for r in refs))


def apply_family(spec: FamilySpec, policies: HookPolicies) -> None:
    # filter first: if nat then fails, 80/443 are rejected rather than let through.
    by_table: dict[str, list[TableSpec]] = {}
    for t in spec.tables:
        by_table.setdefault(t.table, []).append(t)
    for name in sorted(by_table, key=lambda n: n != "filter"):
        apply_table(spec.family, by_table[name])
    # Then what this level does not use: the lock is lifted only after the rest is in.
    absent: dict[str, list[ChainRef]] = {}
    for ref in spec.absent:
        absent.setdefault(ref.table, []).append(ref)
    for refs in absent.values():
        remove_chains(spec.family, refs, policies)


def _tool(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


# ----------------------------------------------------------------------- read back


@dataclass(frozen=True)
class TableState:
    family: int
    table: str
    chain: str
    hook: str
    hook_policy: str | None
    hook_rules: tuple[Rule, ...]
    chain_rules: tuple[Rule, ...] | None  # None: our chain does not exist

    def save_lines(self) -> list[str]:
        """What is there, limited to our chain and its hook, in iptables-save form."""
        lines = [f"*{self.table}", f":{self.hook} {self.hook_policy or '-'}"]
        if self.chain_rules is not None:
            lines.append(f":{self.chain} -")
        lines += [f"-A {self.hook} {r.render()}" for r in self.hook_rules if r.target == self.chain]
        lines += [f"-A {self.chain} {r.render()}" for r in self.chain_rules or ()]
        return [*lines, "COMMIT"]


def read_table(family: int, spec: TableSpec) -> TableState:
    iptc = _iptc()
    table = _table(family, spec.table)
    try:
        table.refresh()
        hook = iptc.Chain(table, spec.hook)
        policy = hook.get_policy()
        hook_rules = tuple(from_iptc(r) for r in hook.rules)
        chain_rules = None
        if table.is_chain(spec.chain):
            chain_rules = tuple(from_iptc(r) for r in iptc.Chain(table, spec.chain).rules)
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        raise _explain(exc, family, spec.table) from exc
    return TableState(
        family=family,
        table=spec.table,
        chain=spec.chain,
        hook=spec.hook,
        hook_policy=policy.name if policy is not None else None,
        hook_rules=hook_rules,
        chain_rules=chain_rules,
    )


def read_absent(family: int, ref: ChainRef) -> list[str]:
    """How a chain of ours that must be absent is still there; empty when it is gone."""
    iptc = _iptc()
    table = _table(family, ref.table)
    where = f"{_tool(family)} {ref.table}"
    try:
        table.refresh()
        hook = iptc.Chain(table, ref.hook)
        jumps = [r for r in hook.rules if r.target is not None and r.target.name == ref.chain]
        exists = table.is_chain(ref.chain)
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        raise _explain(exc, family, ref.table) from exc
    problems = [f"{where}: chain {ref.chain} is present, want none"] if exists else []
    if jumps:
        problems.append(f"{where}: {len(jumps)} jump(s) to {ref.chain} in {ref.hook}, want none")
    return problems


def read_hook_policies(family: int) -> dict[str, tuple[str | None, bool]]:
    """hook -> (its policy, whether a chain of ours hangs off it) for the hooks whose
    policy we set: what `apply` records before it first changes them."""
    iptc = _iptc()
    table = _table(family, "filter")
    out: dict[str, tuple[str | None, bool]] = {}
    try:
        table.refresh()
        for ref in OUR_CHAINS:
            if ref.sets_policy:
                policy = iptc.Chain(table, ref.hook).get_policy()
                out[ref.hook] = (policy.name if policy else None, table.is_chain(ref.chain))
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        raise _explain(exc, family, "filter") from exc
    return out


def diff_table(spec: TableSpec, state: TableState) -> list[str]:
    """Every way the kernel's table differs from the intent; empty when intact."""
    where = f"{_tool(state.family)} {spec.table}"
    problems: list[str] = []
    hook = spec.hook
    if spec.hook_policy and state.hook_policy != spec.hook_policy:
        problems.append(f"{where}: {hook} policy is {state.hook_policy}, want {spec.hook_policy}")
    jumps = [i for i, r in enumerate(state.hook_rules) if r.target == spec.chain]
    if jumps != [0]:
        problems.append(
            f"{where}: want exactly one jump to {spec.chain} first in {hook}, "
            f"found at positions {jumps}"
        )
    elif state.hook_rules[0] != spec.jump:
        problems.append(
            f"{where}: {hook} jump is '{state.hook_rules[0].render()}', want '{spec.jump.render()}'"
        )
    if state.chain_rules is None:
        problems.append(f"{where}: chain {spec.chain} is missing")
        return problems
    want = [r.render() for r in spec.rules]
    have = [r.render() for r in state.chain_rules]
    if want != have:
        for i in range(max(len(want), len(have))):
            w = want[i] if i < len(want) else "(nothing)"
            h = have[i] if i < len(have) else "(nothing)"
            if w != h:
                problems.append(f"{where}: {spec.chain} rule {i + 1} is '{h}', want '{w}'")
    return problems


def families_to_lock(ruleset: Ruleset) -> list[FamilySpec]:
    fams = [ruleset.family(4)]
    if ipv6_available():
        fams.append(ruleset.family(6))
    else:
        logger.warning("kernel has no IPv6: skipping ip6tables")
    return fams


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a forked child and return its result (or re-raise its FirewallError).

    python-iptables keeps one process-wide xtables extension registry: once an
    extension shared by both families (libxt_REDIRECT, libxt_owner, ...) has been
    loaded for IPv4 it cannot be found for IPv6 in the same process ("can't find
    target REDIRECT", "Extension owner revision 0 not supported"), and the other way
    round. So every family is handled in a process of its own.
    """
    _iptc()  # here, not in each child: importing it leaves no extension loaded
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target() -> None:
        try:
            send.send(("ok", fn(*args)))
        except FirewallError as exc:
            send.send(("fw", str(exc)))
        except BaseException as exc:
            send.send(("exc", f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=target, daemon=True)
    proc.start()
    send.close()
    try:
        kind, value = recv.recv()
    except EOFError:
        proc.join()
        raise FirewallError(
            f"iptables helper process died (exit {proc.exitcode}): see the log above"
        ) from None
    proc.join()
    if kind == "ok":
        return value
    if kind == "fw":
        raise FirewallError(value)
    raise FirewallError(f"unexpected error in iptables helper: {value}")


def _read_family(spec: FamilySpec) -> list[tuple[TableSpec, TableState]]:
    return [(t, read_table(spec.family, t)) for t in spec.tables]


def _absent_problems(spec: FamilySpec) -> list[str]:
    return [p for ref in spec.absent for p in read_absent(spec.family, ref)]


def _open_all(spec: FamilySpec) -> None:
    for table in dict.fromkeys(c.table for c in OUR_CHAINS):
        _table(spec.family, table)


def _apply_and_read_back(spec: FamilySpec, policies: HookPolicies) -> list[str]:
    """One family's apply, then what the kernel holds compared with the intent (read
    afresh: read_table refreshes the table from the kernel)."""
    apply_family(spec, policies)
    problems = [p for t in spec.tables for p in diff_table(t, read_table(spec.family, t))]
    return problems + _absent_problems(spec)


def apply(ruleset: Ruleset, policies: HookPolicies | None = None) -> list[str]:
    """Make the kernel match the rule set and read it back: the differences (none when
    the rules in the kernel are exactly the intended ones, as verify() says).
    `policies` are what removed chains' hooks get back (what read_policies recorded
    before the first apply). One helper process per family opens, another applies and
    reads back (a fork each: ~20-50 ms on a busy machine)."""
    check_capabilities()
    fams = families_to_lock(ruleset)
    # Open every table before changing any: a missing ip6tables fails before v4 moves.
    for fam in fams:
        in_child(_open_all, fam)
    full = ruleset.level is LockLevel.FULL
    problems: list[str] = []
    try:
        if full:  # the sets before the rules that name them
            ipset.create(fam.family for fam in fams)
        for fam in fams:
            problems += in_child(_apply_and_read_back, fam, policies or {})
        if not full:  # and gone only once no rule names them
            ipset.destroy(fam.family for fam in fams)
    except ipset.IpsetError as exc:
        raise FirewallError(str(exc)) from exc
    return problems


def read_policies(ruleset: Ruleset) -> HookPolicies | None:
    """The filter hooks' policies as they are before our first apply; None once a
    chain of ours is there (the policy is then ours, not the one to give back)."""
    out: HookPolicies = {}
    for fam in families_to_lock(ruleset):
        for hook, (policy, ours) in in_child(read_hook_policies, fam.family).items():
            if ours:
                return None
            out[(fam.family, hook)] = policy or DEFAULT_HOOK_POLICY
    return out


def read_states(ruleset: Ruleset) -> list[tuple[TableSpec, TableState]]:
    out: list[tuple[TableSpec, TableState]] = []
    for fam in families_to_lock(ruleset):
        out += in_child(_read_family, fam)
    return out


def leftover_problems(ruleset: Ruleset) -> list[str]:
    """Our chains that the rule set's level does not use but are still there."""
    return [p for fam in families_to_lock(ruleset) for p in in_child(_absent_problems, fam)]


def verify(ruleset: Ruleset) -> list[str]:
    check_capabilities()
    problems: list[str] = []
    for spec, state in read_states(ruleset):
        problems += diff_table(spec, state)
    return problems + leftover_problems(ruleset)


def status_text(states: list[tuple[TableSpec, TableState]]) -> str:
    lines: list[str] = []
    current = None
    for _spec, state in states:
        if state.family != current:
            current = state.family
            lines.append(f"# {_tool(state.family)}-legacy (secure-proxy chains only)")
        lines += state.save_lines()
    return "\n".join(lines) + "\n"
