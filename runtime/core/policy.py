"""The policy core: host and path normalisation, rule matching, decisions.

No I/O and no mitmproxy here. The interceptor addon, the host CLI, the
reloader and the tests all call this one module, so there is exactly one
place that decides whether a request may leave the box.

Modelled on smokescreen's ACL (every decision carries its reason) and on
h11 (a core that only transforms values).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from runtime.core.hosts import (
    HostError,
    ip_literal,
    normalize_host,
    normalize_host_pattern,
    split_host_port,
)
from runtime.core.paths import (
    PathEntry,
    may_read_otherwise,
    normalize_entry,
    normalize_path,
    path_readings,
)

# ---------------------------------------------------------------------------
# Vocabulary


class Mode(StrEnum):
    ALLOW_ALL = "allow-all"
    MONITOR = "monitor"
    ENFORCE = "enforce"


class Action(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    #: monitor mode: the request violates the rules but is let through
    VIOLATION = "violation"


class Reason(StrEnum):
    ALLOW_ALL = "allow_all"
    RULE_MATCH = "rule_match"
    HOST_NOT_ALLOWED = "host_not_allowed"
    PATH_NOT_ALLOWED = "path_not_allowed"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    #: The host, path and method are allowed, but not over this scheme (a rule's `schemes`).
    SCHEME_NOT_ALLOWED = "scheme_not_allowed"
    HOST_MISMATCH = "host_mismatch"
    #: Set by the interceptor, never by `decide`: the connection was not HTTP (or asked to
    #: switch to a protocol other than WebSocket), so it cannot be judged and is closed.
    NOT_HTTP = "not_http"
    #: Set by the interceptor, never by `decide`: the policy requires every request to be
    #: logged and the traffic log cannot be written, so nothing may go out unlogged.
    LOG_UNAVAILABLE = "log_unavailable"
    #: Set by the interceptor, never by `decide`: the judged name resolved only to addresses
    #: off the internet (loopback, private, link-local, ...) and the rule does not allow
    #: them (runtime/core/addresses.py).
    PRIVATE_ADDRESS = "private_address"
    #: Set by the interceptor, never by `decide`: the request carries the sign-in token's
    #: placeholder to a host that may not get the token (runtime.core.credentials).
    CREDENTIAL_LEAK = "credential_leak"


BUILT_IN = "built-in"


# ---------------------------------------------------------------------------
# Rules and the compiled policy


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a rule came from: the image's built-in defaults or a user's config file."""

    kind: str  # BUILT_IN or "user"
    file: str | None = None

    @property
    def label(self) -> str:
        return BUILT_IN if self.kind == BUILT_IN else (self.file or "user")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file}


BUILT_IN_ORIGIN = Origin(BUILT_IN)


@dataclass(frozen=True, slots=True)
class Rule:
    host: str  # normalised pattern
    allowed_paths: tuple[PathEntry, ...] = ()
    methods: frozenset[str] | None = None
    origin: Origin = BUILT_IN_ORIGIN
    #: The judged name may resolve to loopback, private, link-local ... addresses.
    allow_private_addresses: bool = False
    #: The schemes allowed (`http`, `https`); None: both. Empty: none (the rule names the
    #: host, replacing any built-in rule for it, and allows nothing).
    schemes: frozenset[str] | None = None
    #: TCP ports other than HTTP(S) the box may open to the addresses the DNS guard
    #: answered for the host (runtime.container.portkeeper), or to the host itself when it
    #: is an IP literal. A rule whose only grant is `ports` has `schemes` empty: no HTTP.
    ports: frozenset[int] = frozenset()
    #: Whether the rule grants HTTP(S) at all: False for a rule whose only grant is
    #: `ports` (no allowed_paths, methods or schemes written).
    http: bool = True

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*.")

    def allows_path(self, path: str) -> bool:
        return not self.allowed_paths or any(entry.covers(path) for entry in self.allowed_paths)

    def allows_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def allows_scheme(self, scheme: str) -> bool:
        return self.schemes is None or scheme in self.schemes

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "host": self.host,
            "allowed_paths": [entry.text for entry in self.allowed_paths],
        }
        if self.methods is not None:
            data["methods"] = sorted(self.methods)
        if self.allow_private_addresses:
            data["allow_private_addresses"] = True
        if self.schemes is not None:
            data["schemes"] = sorted(self.schemes)
        if self.ports:
            data["ports"] = sorted(self.ports)
        if not self.http:
            data["http"] = False
        data["origin"] = self.origin.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rule:
        origin = data.get("origin") or {}
        methods = data.get("methods")
        return make_rule(
            data["host"],
            data.get("allowed_paths", ()),
            methods,
            Origin(origin.get("kind", BUILT_IN), origin.get("file")),
            data.get("schemes"),
            allow_private_addresses=bool(data.get("allow_private_addresses", False)),
            ports=data.get("ports", ()),
            http=bool(data.get("http", True)),
        )


def make_rule(
    host: str,
    allowed_paths: Iterable[str] = (),
    methods: Iterable[str] | None = None,
    origin: Origin = BUILT_IN_ORIGIN,
    schemes: Iterable[str] | None = None,
    *,
    allow_private_addresses: bool = False,
    ports: Iterable[int] = (),
    http: bool = True,
) -> Rule:
    """Build a rule from already validated values, normalising them once."""
    return Rule(
        host=normalize_host_pattern(host),
        allowed_paths=tuple(
            dict.fromkeys(PathEntry(normalize_entry(path)) for path in allowed_paths)
        ),
        methods=None if methods is None else frozenset(m.upper() for m in methods),
        origin=origin,
        allow_private_addresses=allow_private_addresses,
        schemes=None if schemes is None else frozenset(s.lower() for s in schemes),
        ports=frozenset(int(p) for p in ports),
        http=http,
    )


@dataclass(frozen=True, slots=True)
class Request:
    """What the core needs to know about one request.

    The host judged is the TLS SNI, else the Host header, else the authority of
    an absolute-form request target, else the IP dialled. Every name the client
    gives must agree.
    """

    method: str
    path: str
    scheme: str = "https"
    port: int = 443
    sni: str | None = None
    host_header: str | None = None
    dialled: str | None = None
    #: HTTP/1 absolute-form target (`GET http://host/ HTTP/1.1`), or HTTP/2 :authority
    authority: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: Reason
    mode: Mode
    host: str
    path: str
    rule: Rule | None = None
    #: The request's method, and every rule for its host that was tried (a refusal by
    #: path or method): what a suggested fix must keep.
    method: str = ""
    host_rules: tuple[Rule, ...] = ()
    #: PRIVATE_ADDRESS: the upstream address the rule does not allow.
    address: str | None = None

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    @property
    def violation(self) -> bool:
        return self.action is Action.VIOLATION

    @property
    def log_action(self) -> str:
        """The traffic log's `action` field: ALLOW or BLOCK (monitor violations are ALLOW)."""
        return "BLOCK" if self.blocked else "ALLOW"


@dataclass(frozen=True)
class Policy:
    """One immutable, compiled policy. Build it with `Policy.build` or `from_json`."""

    mode: Mode
    log_to_file: bool
    rules: tuple[Rule, ...]
    source: str  # config path, or "built-in defaults"
    #: HTTP rules by pattern (decide, suggestions): exact hosts, and wildcards by suffix.
    exact: Mapping[str, tuple[Rule, ...]] = field(repr=False, default_factory=dict)
    wildcard: Mapping[str, tuple[Rule, ...]] = field(repr=False, default_factory=dict)
    #: Rules that open ports, likewise (ports_for).
    ports_exact: Mapping[str, tuple[Rule, ...]] = field(repr=False, default_factory=dict)
    ports_wildcard: Mapping[str, tuple[Rule, ...]] = field(repr=False, default_factory=dict)

    @classmethod
    def build(cls, mode: Mode, log_to_file: bool, rules: Iterable[Rule], source: str) -> Policy:
        rules = tuple(rules) if mode is not Mode.ALLOW_ALL else ()
        http = _tables(r for r in rules if r.http)
        ports = _tables(r for r in rules if r.ports)
        # Monitor mode always logs: that is its whole point.
        log = True if mode is Mode.MONITOR else log_to_file
        return cls(
            mode=mode,
            log_to_file=log,
            rules=rules,
            source=source,
            exact=http[0],
            wildcard=http[1],
            ports_exact=ports[0],
            ports_wildcard=ports[1],
        )

    # -- lookups --------------------------------------------------------------

    def rules_for_host(self, host: str) -> tuple[Rule, ...]:
        """HTTP rules of the most specific pattern covering `host` (exact beats wildcard).

        A dictionary probe per label: flat however many rules there are.
        """
        return _lookup(self.exact, self.wildcard, host)

    def port_rules_for_host(self, host: str) -> tuple[Rule, ...]:
        """Rules with `ports` of the most specific such pattern covering `host`."""
        return _lookup(self.ports_exact, self.ports_wildcard, host)

    def rules_naming(self, host: str) -> tuple[Rule, ...]:
        """Every rule that grants `host` anything (HTTP or ports): the DNS guard's
        "could allow"."""
        return self.rules_for_host(host) or self.port_rules_for_host(host)

    def ports_for(self, name: str) -> frozenset[int]:
        """The non-HTTP TCP ports the rules of `name` open to its addresses (none in
        allow-all mode: there is no firewall rule to open). `name` is normalised here;
        one that is not a host opens nothing."""
        if self.mode is Mode.ALLOW_ALL:
            return frozenset()
        try:
            host = normalize_host(name)
        except HostError:
            return frozenset()
        return frozenset().union(*(rule.ports for rule in self.port_rules_for_host(host)))

    @property
    def has_ports(self) -> bool:
        """Whether any rule opens a non-HTTP port."""
        return any(rule.ports for rule in self.rules)

    def decide(self, request: Request) -> Decision:
        path = normalize_path(request.path)
        method = request.method.upper()
        try:
            host, mismatch = judged_host(request)
        except HostError:
            host, mismatch = (request.sni or request.host_header or request.dialled or ""), True
            if self.mode is not Mode.ALLOW_ALL:
                return self._verdict(Reason.HOST_NOT_ALLOWED, host, path, None)
        if self.mode is Mode.ALLOW_ALL:
            return Decision(Action.ALLOW, Reason.ALLOW_ALL, self.mode, host, path)
        if mismatch:
            return self._verdict(Reason.HOST_MISMATCH, host, path, None)
        candidates = self.rules_for_host(host)
        if not candidates:
            return self._verdict(Reason.HOST_NOT_ALLOWED, host, path, None)
        # A rule allows the path only if it allows every reading an upstream may take;
        # a path without '%', ';' or a backslash has one (the fast path).
        readings = path_readings(request.path) if may_read_otherwise(request.path) else (path,)
        path_match: Rule | None = None
        scheme_miss: Rule | None = None
        for rule in candidates:
            if (
                rule.allows_path(path)
                if len(readings) == 1
                else all(rule.allows_path(reading) for reading in readings)
            ):
                if not rule.allows_method(method):
                    path_match = path_match or rule
                elif rule.allows_scheme(request.scheme):
                    return Decision(
                        Action.ALLOW, Reason.RULE_MATCH, self.mode, host, path, rule, method
                    )
                else:
                    scheme_miss = scheme_miss or rule
        if scheme_miss is not None:
            return self._verdict(Reason.SCHEME_NOT_ALLOWED, host, path, scheme_miss)
        if path_match is not None:
            return self._verdict(
                Reason.METHOD_NOT_ALLOWED, host, path, path_match, method, candidates
            )
        # Report the reading the rule refused: `/repos/x%2f..%2fadmin` is blocked as `/admin`.
        if len(readings) > 1:
            path = next((r for r in readings if not candidates[0].allows_path(r)), path)
        return self._verdict(Reason.PATH_NOT_ALLOWED, host, path, candidates[0], method, candidates)

    def _verdict(
        self,
        reason: Reason,
        host: str,
        path: str,
        rule: Rule | None,
        method: str = "",
        host_rules: tuple[Rule, ...] = (),
    ) -> Decision:
        action = Action.VIOLATION if self.mode is Mode.MONITOR else Action.BLOCK
        return Decision(action, reason, self.mode, host, path, rule, method, host_rules)

    # -- serialisation (policy.json) ---------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "mode": self.mode.value,
            "log_to_file": self.log_to_file,
            "source": self.source,
            "rules": [rule.to_json() for rule in self.rules],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        if data.get("version") != 1:
            raise ValueError(f"unsupported policy version {data.get('version')!r}")
        return cls.build(
            Mode(data["mode"]),
            bool(data["log_to_file"]),
            (Rule.from_json(rule) for rule in data.get("rules", ())),
            str(data.get("source", "")),
        )


def _tables(
    rules: Iterable[Rule],
) -> tuple[dict[str, tuple[Rule, ...]], dict[str, tuple[Rule, ...]]]:
    """(exact host -> rules, wildcard suffix -> rules), in the rules' order."""
    exact: dict[str, list[Rule]] = {}
    wildcard: dict[str, list[Rule]] = {}
    for rule in rules:
        table, key = (wildcard, rule.host[2:]) if rule.is_wildcard else (exact, rule.host)
        table.setdefault(key, []).append(rule)
    return (
        {k: tuple(v) for k, v in exact.items()},
        {k: tuple(v) for k, v in wildcard.items()},
    )


def _lookup(
    exact: Mapping[str, tuple[Rule, ...]], wildcard: Mapping[str, tuple[Rule, ...]], host: str
) -> tuple[Rule, ...]:
    found = exact.get(host)
    if found:
        return found
    if ip_literal(host) is not None:
        return ()
    rest = host
    while "." in rest:
        rest = rest.split(".", 1)[1]
        found = wildcard.get(rest)
        if found:
            return found
    return ()


def judged_host(request: Request) -> tuple[str, bool]:
    """(host to judge, whether the names the client gave disagree: domain fronting).

    SNI, Host header and an absolute-form target's authority each name a host;
    an upstream that honours one other than the one judged (a CDN, a proxy)
    would be reached in the name of another, so any disagreement is a mismatch.
    """
    names = [
        normalize_host(name if source == "sni" else split_host_port(name))
        for source, name in (
            ("sni", request.sni),
            ("header", request.host_header),
            ("authority", request.authority),
        )
        if name
    ]
    if names:
        return names[0], any(name != names[0] for name in names[1:])
    if request.dialled:
        return normalize_host(request.dialled), False
    raise HostError("request names no host")


def suggested_rules(decision: Decision) -> list[dict[str, Any]]:
    """The rules a user could add to `allowed_rules` so that this request is allowed.

    A new host gets one rule. A host that has rules gets one more, as narrow as the
    request: its path's parent, and its method when that host's rules name methods.
    A user rule for a host replaces every built-in rule for that host, so when the
    host's rules are built-in they come first, copied, and nothing they allowed is lost.
    """
    if decision.reason is Reason.PRIVATE_ADDRESS and decision.rule is not None:
        # The rule that matched, told it may reach a private address.
        rule = decision.rule.to_json()
        rule.pop("origin")
        if not rule["allowed_paths"]:
            rule.pop("allowed_paths")
        return [{**rule, "allow_private_addresses": True}]
    if (
        decision.reason is Reason.SCHEME_NOT_ALLOWED
        and decision.rule is not None
        and decision.rule.schemes
    ):
        # The rule that matched, over plain HTTP too.
        rule = decision.rule.to_json()
        rule.pop("origin")
        rule.pop("schemes")
        if not rule["allowed_paths"]:
            rule.pop("allowed_paths")
        return [rule]
    if decision.reason not in (Reason.PATH_NOT_ALLOWED, Reason.METHOD_NOT_ALLOWED) or (
        decision.rule is None
    ):
        return [{"host": decision.host, "allowed_paths": [_parent(decision.path)]}]
    host = decision.rule.host
    tried = decision.host_rules or (decision.rule,)
    new: dict[str, Any] = {"host": host, "allowed_paths": [_parent(decision.path)]}
    restricted = decision.reason is Reason.METHOD_NOT_ALLOWED or any(
        r.methods is not None for r in tried
    )
    if restricted and decision.method:
        new["methods"] = [decision.method]
    copies = []
    for rule in tried:
        if rule.origin.kind == BUILT_IN and rule.host == host:
            copy = rule.to_json()
            copy.pop("origin")
            if not copy["allowed_paths"]:
                copy.pop("allowed_paths")
            copies.append(copy)
    return [*copies, new]


def suggested_rule(decision: Decision) -> dict[str, Any]:
    """The one rule this request needs (the last of `suggested_rules`)."""
    return suggested_rules(decision)[-1]


def _parent(path: str) -> str:
    """`/v1/models` -> `/v1/`: the narrowest useful prefix to suggest."""
    head = path.rsplit("/", 1)[0]
    return head + "/" if head else path
