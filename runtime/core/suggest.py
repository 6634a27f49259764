"""Rules from what was seen, and what a policy would now decide: pure.

The way a user adopts the guard is to monitor a few runs, turn what the agent
reached into rules, and switch to enforce. This module does the turning:

- `suggest(seen, policy, depth)` gives the smallest set of rule changes that
  would allow every request seen and not allowed by `policy`: exact hosts
  (never a wildcard), paths folded at segment boundaries (`depth` segments
  kept), methods listed when only safe ones were seen. A change that widens
  access beyond what was seen is flagged, never silent.
- `replay(seen, policy)` judges every recorded request again and lists those
  whose outcome changed: the "what if I switch to enforce" question.

Both take `Seen` values, built by a log reader from traffic-log records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from runtime.core.hosts import HostError, normalize_host
from runtime.core.paths import normalize_path
from runtime.core.policy import BUILT_IN, Mode, Policy, Request, Rule

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_DEPTH = 2


@dataclass(frozen=True, slots=True)
class Seen:
    """One recorded HTTP request, as a log reader gives it."""

    method: str
    host: str
    path: str
    scheme: str = "https"
    port: int = 443
    blocked: bool = False  # the request was refused when it was made
    violation: bool = False  # monitor mode: it would have been refused


@dataclass(frozen=True)
class RuleChange:
    """One rule to add (or a rule of the config to extend) for one host."""

    host: str
    allowed_paths: tuple[str, ...]  # () allows every path
    methods: tuple[str, ...] | None  # suggest: the methods seen, never more; None: every one
    extends: bool  # True: the config has a rule for this host with these methods
    requests: int  # how many of the seen requests this change allows
    warnings: tuple[str, ...] = ()  # how it widens access beyond what was seen
    #: Rules that decide this host now (built-in, or a wildcard) and would stop doing so
    #: once the config names the host: copied for it, so nothing allowed before is lost.
    carried: tuple[dict[str, object], ...] = ()

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"host": self.host}
        if self.allowed_paths:
            data["allowed_paths"] = list(self.allowed_paths)
        if self.methods is not None:
            data["methods"] = list(self.methods)
        return data


def fold_path(path: str, depth: int) -> str:
    """The prefix a rule would use for `path`: its first `depth` segments, as a prefix.

    `/repos/o/r/pulls/1` at depth 2 is `/repos/o/`; a path no deeper than
    `depth` is kept exactly (`/user` stays `/user`, which covers `/user/...`).
    depth 0 means the whole host (`/`).
    """
    path = normalize_path(path)
    segments = [s for s in path.split("/") if s]
    if depth <= 0:
        return "/"
    if len(segments) <= depth:
        return path.rstrip("/") or "/"
    return "/" + "/".join(segments[:depth]) + "/"


def _minimal(prefixes: Iterable[str]) -> tuple[str, ...]:
    """Drop every entry another one already covers (as PathEntry.covers does)."""
    out: list[str] = []
    for entry in sorted(set(prefixes), key=lambda p: (len(p), p)):
        if not any(_covers(kept, entry) for kept in out):
            out.append(entry)
    return tuple(sorted(out))


def _covers(entry: str, path: str) -> bool:
    if entry == "/":
        return True
    if entry.endswith("/"):
        return path.startswith(entry)
    return path == entry or path.startswith(entry + "/")


def _is_private(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost" or host.endswith((".local", ".internal", ".localhost"))
    return not address.is_global


def _allowed(policy: Policy, item: Seen) -> bool:
    request = Request(
        method=item.method,
        path=item.path,
        scheme=item.scheme,
        port=item.port,
        sni=item.host if item.scheme == "https" else None,
        host_header=item.host,
    )
    decision = policy.decide(request)
    return not decision.blocked and not decision.violation


def _carried(rule: Rule, host: str) -> dict[str, object]:
    """`rule` as a rule of the config for exactly `host` (its origin dropped)."""
    data = rule.to_json()
    data.pop("origin", None)
    data["host"] = host
    if not data.get("allowed_paths"):
        data.pop("allowed_paths", None)
    return data


def suggest(seen: Iterable[Seen], policy: Policy, depth: int = DEFAULT_DEPTH) -> list[RuleChange]:
    """The rule changes that would allow every seen request `policy` does not allow.

    Methods are the ones seen (a write is flagged, never widened to every method).
    When the config has no rule of its own for a host, the rules that decide it now
    (built-in ones, a wildcard) are copied with the new rule: a rule of the config for
    a host replaces the built-in rules for it and shadows a wildcard.
    """
    wanted: dict[str, list[Seen]] = {}
    for item in seen:
        try:
            host = normalize_host(item.host)
        except HostError:
            continue
        if policy.mode is Mode.ALLOW_ALL or not _allowed(policy, item):
            wanted.setdefault(host, []).append(item)
    changes = []
    for host, items in sorted(wanted.items()):
        own = any(r.origin.kind != BUILT_IN and r.host == host for r in policy.rules_for_host(host))
        carried = () if own else carried_rules(policy, host)
        # Reads and writes apart: the reads can be taken while the writes stay flagged.
        reads = [i for i in items if i.method.upper() in SAFE_METHODS]
        writes = [i for i in items if i.method.upper() not in SAFE_METHODS]
        for group in (reads, writes):
            if group:
                changes.append(_change(host, group, depth, own, carried))
    return changes


def _change(
    host: str,
    items: list[Seen],
    depth: int,
    own: bool,
    carried: tuple[dict[str, object], ...],
) -> RuleChange:
    paths = _minimal(fold_path(i.path, depth) for i in items)
    methods_seen = tuple(sorted({i.method.upper() for i in items}))
    warnings: list[str] = []
    writes = [m for m in methods_seen if m not in SAFE_METHODS]
    if writes:
        warnings.append(f"allows writes ({', '.join(writes)})")
    if _is_private(host):
        warnings.append("a private or local address")
    if paths == ("/",):
        paths = ()
    if not paths:
        distinct = {normalize_path(i.path) for i in items}
        if len(distinct) <= 1:
            warnings.append("the whole host, for requests to one path")
        else:
            warnings.append("the whole host")
    return RuleChange(
        host=host,
        allowed_paths=paths,
        methods=methods_seen,
        extends=own,
        requests=len(items),
        warnings=tuple(warnings),
        carried=carried,
    )


def carried_rules(policy: Policy, host: str) -> tuple[dict[str, object], ...]:
    """The rules deciding `host` now that a new rule of the config for it would replace
    (built-in) or shadow (a wildcard): as rules of the config for exactly `host`."""
    if policy.mode is Mode.ALLOW_ALL:
        return ()
    deciding = policy.rules_for_host(host)
    if any(r.origin.kind != BUILT_IN and r.host == host for r in deciding):
        return ()
    return tuple(_carried(r, host) for r in deciding)


def _same_host(rule: dict[str, object], host: str) -> bool:
    return str(rule.get("host", "")).strip().lower().rstrip(".") == host


def _methods(rule: dict[str, object]) -> frozenset[str] | None:
    methods = rule.get("methods")
    if not isinstance(methods, list):
        return None
    return frozenset(str(m).upper() for m in methods)


def apply_changes(
    rules: Sequence[dict[str, object]], changes: Iterable[RuleChange]
) -> list[dict[str, object]]:
    """The `allowed_rules` list of a config with the changes applied (order and keys kept).

    A change extends a rule of the config for the same host with the same methods
    (and no `schemes`): its paths are added. Otherwise the change is a rule of its
    own after the others, so no rule allows a method on a path it did not before.
    """
    out = [dict(rule) for rule in rules]
    for change in changes:
        out += [dict(rule) for rule in change.carried if rule not in out]
        target = next(
            (
                r
                for r in out
                if _same_host(r, change.host)
                and _methods(r) == (None if change.methods is None else frozenset(change.methods))
                and "schemes" not in r
                and r.get("allowed_paths")  # [] already allows every path
            ),
            None,
        )
        if target is None:
            out.append(change.to_json())
            continue
        paths = list(target["allowed_paths"])  # type: ignore[call-overload]
        if not change.allowed_paths:
            target["allowed_paths"] = []
        else:
            target["allowed_paths"] = paths + [p for p in change.allowed_paths if p not in paths]
    return out


@dataclass(frozen=True)
class Replayed:
    item: Seen
    was_allowed: bool
    now_allowed: bool
    reason: str
    rule: str | None = None


@dataclass
class ReplayReport:
    newly_blocked: list[Replayed] = field(default_factory=list)
    newly_allowed: list[Replayed] = field(default_factory=list)
    unchanged: int = 0


def replay(seen: Iterable[Seen], policy: Policy) -> ReplayReport:
    """Judge every recorded request against `policy`, as enforce mode would.

    "Allowed" means the request would go through in enforce mode: a monitor
    policy is judged as its enforce twin, since that is the question asked.
    """
    enforce = Policy.build(
        Mode.ENFORCE if policy.mode is Mode.MONITOR else policy.mode,
        policy.log_to_file,
        policy.rules,
        policy.source,
    )
    report = ReplayReport()
    for item in seen:
        was = not item.blocked and not item.violation
        request = Request(
            method=item.method,
            path=item.path,
            scheme=item.scheme,
            port=item.port,
            sni=item.host if item.scheme == "https" else None,
            host_header=item.host,
        )
        decision = enforce.decide(request)
        now = not decision.blocked
        if now == was:
            report.unchanged += 1
            continue
        entry = Replayed(
            item, was, now, decision.reason.value, decision.rule.host if decision.rule else None
        )
        (report.newly_allowed if now else report.newly_blocked).append(entry)
    return report
