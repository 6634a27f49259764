"""The policy core: host and path normalisation, rule matching, decisions.

No I/O and no mitmproxy here. The interceptor addon, the host CLI, the
reloader and the tests all call this one module, so there is exactly one
place that decides whether a request may leave the box.

Modelled on smokescreen's ACL (every decision carries its reason) and on
h11 (a core that only transforms values).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import idna

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
    HOST_MISMATCH = "host_mismatch"
    #: Set by the interceptor, never by `decide`: the connection was not HTTP (or asked to
    #: switch to a protocol other than WebSocket), so it cannot be judged and is closed.
    NOT_HTTP = "not_http"
    #: Set by the interceptor, never by `decide`: the policy requires every request to be
    #: logged and the traffic log cannot be written, so nothing may go out unlogged.
    LOG_UNAVAILABLE = "log_unavailable"
    #: Set by the interceptor, never by `decide`: the request carries the sign-in token's
    #: placeholder to a host that may not get the token (runtime.core.credentials).
    CREDENTIAL_LEAK = "credential_leak"


BUILT_IN = "built-in"


class HostError(ValueError):
    """A host that cannot be used in a rule or judged; `suggestion` is the form to use."""

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


# ---------------------------------------------------------------------------
# Hosts


_ASCII_HOST = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")
#: Without a ':' only dotted decimal can be an IP literal (ipaddress accepts no other IPv4 form).
_NOT_DOTTED_DECIMAL = re.compile(r"[^0-9.]")


def _ip_literal(text: str) -> str | None:
    """The canonical text of an IP literal (brackets allowed around IPv6), else None."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" not in candidate and _NOT_DOTTED_DECIMAL.search(candidate):
        # A name: ipaddress would raise twice (v4, v6) to say so, the costliest part of a
        # decision before this check.
        return None
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def normalize_host(raw: str) -> str:
    """Canonical form of a host name or IP literal, as rules and requests compare it.

    Pure, and called two or three times per request with the same few names (SNI,
    Host header, upstream): cached, bounded. Errors are raised again each time.

    Lower case, one trailing dot dropped, international names in punycode
    (IDNA 2008 with UTS 46 mapping), IPv6 compressed without brackets.
    Raises HostError for anything that is not a host.
    """
    text = raw.strip()
    if not text:
        raise HostError("host is empty")
    ip = _ip_literal(text)
    if ip is not None:
        return ip
    if text.endswith("."):
        text = text[:-1]
    if not text or text.startswith(".") or ".." in text:
        raise HostError(f"{raw!r} has an empty label")
    if text.isascii():
        # Plain ASCII names are compared as DNS sees them. IDNA 2008 would
        # reject underscores, which real hosts (and DNS) do use.
        name = text.lower()
        if not _ASCII_HOST.fullmatch(name) or len(name) > 253:
            raise HostError(
                f"{raw!r} is not a valid host name (letters, digits, '-' and '_' in "
                "dot-separated labels of at most 63 characters)"
            )
        return name
    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise HostError(f"{raw!r} is not a valid host name ({exc})") from None


def normalize_host_pattern(raw: str) -> str:
    """Canonical form of a rule's host: a host, an IP literal, or `*.` + a host."""
    text = raw.strip()
    if text.startswith("*."):
        rest = normalize_host(text[2:])
        if _ip_literal(rest) is not None:
            raise HostError(f"{raw!r}: a wildcard cannot cover an IP address", rest)
        return "*." + rest
    if "*" in text:
        raise HostError(
            f"{raw!r}: '*' is only allowed as the whole first label, as in '*.example.com'"
        )
    return normalize_host(text)


def split_host_port(value: str) -> str:
    """Host part of a Host header or authority (`example.com:443`, `[::1]:80`)."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


# ---------------------------------------------------------------------------
# Paths

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalize_path_escapes(path: str) -> str:
    """Decode percent-encoded unreserved characters; upper-case the other escapes."""
    return _PERCENT.sub(_decode_unreserved, path)


def _resolve(path: str, params: bool = True) -> str:
    """Dot segments resolved and empty segments dropped, on text already decoded.

    `params`: `..;x` is `..`, as servlet containers strip path parameters; without,
    it is a name, as nginx and Node read it.
    """
    out: list[str] = []
    segments = path.split("/")
    for segment in segments:
        if not segment:
            continue
        if segment[0] == ".":  # only these can be dot segments
            name = segment.split(";", 1)[0] if params else segment
            if name == ".":
                continue
            if name == "..":
                if out:
                    out.pop()
                continue
        out.append(segment)
    normalized = "/" + "/".join(out)
    last = segments[-1]
    if out and (not last or (last.split(";", 1)[0] if params else last) in (".", "..")):
        normalized += "/"
    return normalized


def _resolutions(decoded: str) -> tuple[str, ...]:
    """`decoded` resolved with path parameters stripped and, if that differs, kept."""
    servlet = _resolve(decoded)
    if ";" not in decoded:
        return (servlet,)
    literal = _resolve(decoded, params=False)
    return (servlet,) if literal == servlet else (servlet, literal)


def normalize_path(raw: str) -> str:
    """The path as written: the first of `path_readings`, and what the traffic log shows.

    Query and fragment dropped, percent-encoded unreserved characters decoded
    (other escapes upper-cased: `%2f` is data here), dot segments resolved,
    repeated slashes collapsed. Always starts with `/`.
    """
    path = raw.split("#", 1)[0].split("?", 1)[0]
    if path[:1] == "/" and "%" not in path and "/." not in path and "//" not in path:
        # Already normal (the common case): no escapes, and every segment is non-empty
        # (but a trailing one) and cannot be a dot segment, which starts with '.'.
        return path
    return _resolve(normalize_path_escapes(path))


#: What makes upstreams read a path differently: an encoded '/', '\' or '%' (a second
#: decoding pass), a '%' that starts no escape (decoded hex digits may complete one), a '\'.
_AMBIGUOUS = re.compile(r"%(?:2[Ff]|5[Cc]|25|(?![0-9A-Fa-f]{2}))|\\")
#: Escapes an upstream may decode beyond the unreserved characters, by their hex code.
_SEPARATOR_ESCAPES = ("2F", "5C", "25")
#: More readings than this, or more characters decoded to find them, and the path may be
#: anything: "/" joins the readings (only an entry covering every path covers it). Real
#: paths have one to four readings and take a few passes; the bound keeps a crafted
#: path's cost to milliseconds.
MAX_READINGS = 32
MAX_DECODED = 16_384
_BACKSLASH_NONE, _BACKSLASH_RAW, _BACKSLASH_ALL = 0, 1, 2


@functools.lru_cache(maxsize=16)
def _decode_table(extra: frozenset[str]) -> dict[str, str]:
    """Each two-digit escape code (any case) -> what a pass decoding `extra` makes of it."""
    table = {}
    for value in range(256):
        char, code = chr(value), f"{value:02X}"
        decoded = char if char in _UNRESERVED or code in extra else "%" + code
        for spelling in {code, code.lower(), code[0] + code[1].lower(), code[0].lower() + code[1]}:
            table[spelling] = decoded
    return table


def _decode_pass(path: str, extra: frozenset[str], backslash: int) -> str:
    """One upstream's decoding pass: unreserved characters and `extra` escapes, once.

    `backslash`: none is a separator, raw ones only (translated before decoding,
    as lighttpd on Windows), or every one (decoded `%5C` too, as IIS).
    """
    if backslash == _BACKSLASH_RAW:
        path = path.replace("\\", "/")
    if "%" in path:
        # split beats re.sub with a callback by half: this is the readings' hot loop.
        table = _decode_table(extra)
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            decoded = table.get(part[:2])
            if decoded is None:  # a bare '%'
                out.append("%" + part)
            else:
                out += (decoded, part[2:])
        path = "".join(out)
    return path.replace("\\", "/") if backslash == _BACKSLASH_ALL else path


@functools.lru_cache(maxsize=64)
def _passes(features: frozenset[str]) -> tuple[tuple[frozenset[str], int], ...]:
    """The decoding passes that can change a path with these features (escape codes, '\\')."""
    codes = [code for code in _SEPARATOR_ESCAPES if code in features]
    out = []
    for mask in range(1 << len(codes)):
        extra = frozenset(code for i, code in enumerate(codes) if mask >> i & 1)
        modes = [_BACKSLASH_NONE]
        if "\\" in features:
            modes.append(_BACKSLASH_RAW)
        if "5C" in extra:
            modes.append(_BACKSLASH_ALL)
        out += [(extra, mode) for mode in modes]
    return tuple(out)


def _features(path: str) -> frozenset[str]:
    """What in `path` a pass may read: `2F`, `5C`, `25`, `\\`, and "" for a bare '%'."""
    return frozenset(
        "\\" if token == "\\" else token[1:].upper() for token in set(_AMBIGUOUS.findall(path))
    )


#: An escape of an unreserved character: in a text a pass handed on, only from `%25`
#: or a bare '%' (`%%34%31` is `%41`); the next pass decodes it.
_UNRESERVED_ESCAPE = re.compile(r"%(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|2[DdEe]|5[Ff]|7[Ee])")


def path_readings(raw: str) -> tuple[str, ...]:
    """Every path an upstream, or a chain of them, may serve for `raw`; the first is
    `normalize_path(raw)`, the path as written.

    Upstreams disagree: nginx, lighttpd and Python's http.server decode `%2F` and
    then resolve dot segments (`/a/x%2f..%2f..%2fb` is `/b`), WHATWG URL parsers
    (Node) and Windows servers take `\\` for `/`, IIS decodes `%5C` to a separator,
    a decoding proxy that forwards without re-encoding has the next server decode
    `%25` again, and a proxy may resolve dot segments before the server decodes.
    So a reading is what dot-segment resolution makes of the path after any chain of
    decoding passes (each: unreserved characters, plus any of `%2F`, `%5C`, `%25`, with
    `\\` a separator or not), with or without resolution between the passes.
    Path parameters too: `..;x` is `..` to servlet containers and a name to others.
    Cheap: a path without `%2F`, `%5C`, `%25`, a bare `%`, `\\` or `;` has one reading.
    Past MAX_READINGS readings or MAX_DECODED characters decoded, "/" stands for anything.
    """
    path = raw.split("#", 1)[0].split("?", 1)[0]
    first = normalize_path(path)
    as_written = (first,)
    if ";" in path:  # `..;x` is `..` to servlet containers, a name to others
        as_written = _resolutions(normalize_path_escapes(path))
    if ("%" not in path and "\\" not in path) or not _AMBIGUOUS.search(path):
        # Every pass decodes this path as normalize_path does, and no escape can form.
        return as_written
    readings = dict.fromkeys(as_written)  # an insertion-ordered set
    # Texts an upstream may hand on, decoded or not, resolved or not: `first` is what a
    # proxy that only resolves dot segments forwards.
    todo = list(dict.fromkeys((path, *as_written)))
    seen = set(todo)
    budget = MAX_DECODED
    while todo:
        text = todo.pop()
        features = _features(text)
        passes = _passes(features)
        # The plain pass changes a text only through unreserved escapes: on the path as
        # written it gives `as_written` (unless a bare '%' completes an escape), and a
        # text handed on has them only when the pass before made them.
        if ("" not in features) if text is path else not _UNRESERVED_ESCAPE.search(text):
            passes = passes[1:]
        budget -= len(passes) * len(text)
        if budget < 0:
            readings["/"] = None
            break
        for extra, backslash in passes:
            decoded = _decode_pass(text, extra, backslash)
            resolved = _resolutions(decoded)
            readings.update(dict.fromkeys(resolved))
            for handed_on in (decoded, *resolved):
                # A text with nothing left to decode has no reading but its resolution.
                if handed_on not in seen and (
                    _AMBIGUOUS.search(handed_on) or _UNRESERVED_ESCAPE.search(handed_on)
                ):
                    seen.add(handed_on)
                    todo.append(handed_on)
        if len(readings) > MAX_READINGS:
            readings["/"] = None
            break
    return tuple(readings)


#: A whole path segment that matches any one segment: `/*/*/info/refs`.
SEGMENT_WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class PathEntry:
    """One `allowed_paths` entry, normalised once at compile time.

    Ending in `/`: a prefix (`/repos/` covers `/repos/a/b`). Otherwise the path
    and what lies below it at a segment boundary (`/user` covers `/user/x`, not
    `/users`). A segment that is exactly `*` matches any one segment, never a
    `/`: `/*/*/git-upload-pack` covers `/o/r.git/git-upload-pack`.
    """

    text: str

    @property
    def is_prefix(self) -> bool:
        return self.text.endswith("/")

    def covers(self, path: str) -> bool:
        if SEGMENT_WILDCARD in self.text:
            return _covers_by_segments(self.text, path)
        if self.is_prefix:
            return path.startswith(self.text)
        return path == self.text or path.startswith(self.text + "/")


@functools.lru_cache(maxsize=4096)
def _segments(path: str) -> tuple[str, ...]:
    inner = path.strip("/")
    return tuple(inner.split("/")) if inner else ()


def _covers_by_segments(pattern_text: str, path: str) -> bool:
    pattern, segments = _segments(pattern_text), _segments(path)
    if len(segments) < len(pattern):
        return False
    for want, got in zip(pattern, segments, strict=False):
        if want != SEGMENT_WILDCARD and want != got:
            return False
    if pattern_text.endswith("/"):  # a prefix covers what lies below it, or itself with '/'
        return len(segments) > len(pattern) or path.endswith("/")
    return True


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

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*.")

    def allows_path(self, path: str) -> bool:
        return not self.allowed_paths or any(entry.covers(path) for entry in self.allowed_paths)

    def allows_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "host": self.host,
            "allowed_paths": [entry.text for entry in self.allowed_paths],
        }
        if self.methods is not None:
            data["methods"] = sorted(self.methods)
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
        )


def make_rule(
    host: str,
    allowed_paths: Iterable[str] = (),
    methods: Iterable[str] | None = None,
    origin: Origin = BUILT_IN_ORIGIN,
) -> Rule:
    """Build a rule from already validated values, normalising them once."""
    return Rule(
        host=normalize_host_pattern(host),
        allowed_paths=tuple(
            dict.fromkeys(PathEntry(normalize_path(path)) for path in allowed_paths)
        ),
        methods=None if methods is None else frozenset(m.upper() for m in methods),
        origin=origin,
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
    exact: Mapping[str, tuple[Rule, ...]] = field(repr=False, default_factory=dict)
    wildcard: Mapping[str, tuple[Rule, ...]] = field(repr=False, default_factory=dict)

    @classmethod
    def build(cls, mode: Mode, log_to_file: bool, rules: Iterable[Rule], source: str) -> Policy:
        rules = tuple(rules) if mode is not Mode.ALLOW_ALL else ()
        exact: dict[str, list[Rule]] = {}
        wildcard: dict[str, list[Rule]] = {}
        for rule in rules:
            table, key = (wildcard, rule.host[2:]) if rule.is_wildcard else (exact, rule.host)
            table.setdefault(key, []).append(rule)
        # Monitor mode always logs: that is its whole point.
        log = True if mode is Mode.MONITOR else log_to_file
        return cls(
            mode=mode,
            log_to_file=log,
            rules=rules,
            source=source,
            exact={k: tuple(v) for k, v in exact.items()},
            wildcard={k: tuple(v) for k, v in wildcard.items()},
        )

    # -- lookups --------------------------------------------------------------

    def rules_for_host(self, host: str) -> tuple[Rule, ...]:
        """Rules of the most specific pattern covering `host` (exact beats wildcard).

        A dictionary probe per label: flat however many rules there are.
        """
        found = self.exact.get(host)
        if found:
            return found
        if _ip_literal(host) is not None:
            return ()
        rest = host
        while "." in rest:
            rest = rest.split(".", 1)[1]
            found = self.wildcard.get(rest)
            if found:
                return found
        return ()

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
        raw = request.path
        if ";" in raw or (("%" in raw or "\\" in raw) and _AMBIGUOUS.search(raw)):
            readings = path_readings(raw)
        else:
            readings = (path,)
        path_match: Rule | None = None
        for rule in candidates:
            if (
                rule.allows_path(path)
                if len(readings) == 1
                else all(rule.allows_path(reading) for reading in readings)
            ):
                if rule.allows_method(method):
                    return Decision(Action.ALLOW, Reason.RULE_MATCH, self.mode, host, path, rule)
                path_match = path_match or rule
        if path_match is not None:
            return self._verdict(Reason.METHOD_NOT_ALLOWED, host, path, path_match)
        # Report the reading the rule refused: `/repos/x%2f..%2fadmin` is blocked as `/admin`.
        if len(readings) > 1:
            path = next((r for r in readings if not candidates[0].allows_path(r)), path)
        return self._verdict(Reason.PATH_NOT_ALLOWED, host, path, candidates[0])

    def _verdict(self, reason: Reason, host: str, path: str, rule: Rule | None) -> Decision:
        action = Action.VIOLATION if self.mode is Mode.MONITOR else Action.BLOCK
        return Decision(action, reason, self.mode, host, path, rule)

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


def suggested_rule(decision: Decision) -> dict[str, Any]:
    """The rule a user could add so that this request would be allowed."""
    if decision.reason is Reason.METHOD_NOT_ALLOWED and decision.rule is not None:
        rule = decision.rule.to_json()
        rule.pop("origin")
        return rule
    if decision.reason is Reason.PATH_NOT_ALLOWED and decision.rule is not None:
        paths = [entry.text for entry in decision.rule.allowed_paths]
        return {"host": decision.rule.host, "allowed_paths": [*paths, _parent(decision.path)]}
    return {"host": decision.host, "allowed_paths": [_parent(decision.path)]}


def _parent(path: str) -> str:
    """`/v1/models` -> `/v1/`: the narrowest useful prefix to suggest."""
    head = path.rsplit("/", 1)[0]
    return head + "/" if head else path
