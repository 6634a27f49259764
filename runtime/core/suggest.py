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

from runtime.core.policy import (
    BUILT_IN,
    HostError,
    Mode,
    Policy,
    Request,
    normalize_host,
    normalize_path,
)

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
    methods: tuple[str, ...] | None  # None allows every method
    extends: bool  # True: the config has a rule for this host; these are added to it
    requests: int  # how many of the seen requests this change allows
    warnings: tuple[str, ...] = ()  # how it widens access beyond what was seen

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


def suggest(seen: Iterable[Seen], policy: Policy, depth: int = DEFAULT_DEPTH) -> list[RuleChange]:
    """The rule changes that would allow every seen request `policy` does not allow."""
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
        existing = [r for r in policy.rules_for_host(host) if r.origin.kind != BUILT_IN]
        exact = [r for r in existing if r.host == host]
        paths = _minimal(fold_path(i.path, depth) for i in items)
        methods_seen = sorted({i.method.upper() for i in items})
        only_safe = set(methods_seen) <= SAFE_METHODS
        warnings: list[str] = []
        if not only_safe:
            writes = ", ".join(m for m in methods_seen if m not in SAFE_METHODS)
            warnings.append(f"allows writes ({writes})")
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
        changes.append(
            RuleChange(
                host=host,
                allowed_paths=paths,
                methods=tuple(methods_seen) if only_safe else None,
                extends=bool(exact),
                requests=len(items),
                warnings=tuple(warnings),
            )
        )
    return changes


def apply_changes(
    rules: Sequence[dict[str, object]], changes: Iterable[RuleChange]
) -> list[dict[str, object]]:
    """The `allowed_rules` list of a config with the changes applied (order and keys kept).

    A change for a host the config already names extends that rule's paths and
    methods; a rule that allows every path or method stays as wide as it was.
    """
    out = [dict(rule) for rule in rules]
    for change in changes:
        target = next(
            (r for r in out if str(r.get("host", "")).lower().rstrip(".") == change.host), None
        )
        if target is None:
            out.append(change.to_json())
            continue
        paths = list(target.get("allowed_paths", []) or [])  # type: ignore[arg-type]
        if paths:  # [] already allows every path
            if not change.allowed_paths:
                target["allowed_paths"] = []
            else:
                target["allowed_paths"] = paths + [
                    p for p in change.allowed_paths if p not in paths
                ]
        methods = target.get("methods")
        if methods is not None:
            if change.methods is None:
                target.pop("methods")
            else:
                known = [str(m).upper() for m in methods]  # type: ignore[union-attr]
                target["methods"] = list(methods) + [m for m in change.methods if m not in known]  # type: ignore[operator]
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
