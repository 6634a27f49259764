"""The `network.json` model: parsing, validation with actionable errors, compilation.

Pure: text and values in, a config or a list of problems out. Reading files is
`runtime.resolve`'s job. Every problem names the field (a JSON pointer) and
the fix, in the manner of smokescreen's ACL errors.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from runtime.core.policy import (
    BUILT_IN_ORIGIN,
    EXACT,
    SEGMENT_WILDCARD,
    HostError,
    Mode,
    Origin,
    Policy,
    Rule,
    make_rule,
    normalize_host_pattern,
    normalize_path,
    normalize_path_escapes,
)

TOP_LEVEL_KEYS = ("$schema", "enabled", "inherit_defaults", "mode", "log_to_file", "allowed_rules")
RULE_KEYS = ("host", "allowed_paths", "methods", "schemes", "allow_private_addresses")
SCHEMES = ("http", "https")
#: The modes a config may name: the core's own vocabulary (allow-all comes from enabled).
MODES = (Mode.MONITOR.value, Mode.ENFORCE.value)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")

# Names people reach for from other tools; difflib alone would not find these.
ALIASES = {
    "allowedhosts": "allowed_rules",
    "allowed_hosts": "allowed_rules",
    "allowedrules": "allowed_rules",
    "rules": "allowed_rules",
    "hosts": "allowed_rules",
    "allowed_domains": "allowed_rules",
    "allowlist": "allowed_rules",
    "inheritdefaults": "inherit_defaults",
    "logtofile": "log_to_file",
    "log": "log_to_file",
    "enable": "enabled",
    "paths": "allowed_paths",
    "allowedpaths": "allowed_paths",
    "path": "allowed_paths",
    "method": "methods",
    "scheme": "schemes",
    # copilot_here's Airlock names, in a file that is otherwise ours (see runtime.core.airlock)
    "enable_logging": "log_to_file",
    "inherit_default_rules": "inherit_defaults",
    "domain": "host",
    "hostname": "host",
    "allow_private": "allow_private_addresses",
    "allow_private_ips": "allow_private_addresses",
    "allow_private_ip": "allow_private_addresses",
    "allow_private_networks": "allow_private_addresses",
    "allow_local": "allow_private_addresses",
    "allow_local_addresses": "allow_private_addresses",
    "allow_internal": "allow_private_addresses",
    "allow_loopback": "allow_private_addresses",
    "allow_lan": "allow_private_addresses",
    "allowprivateaddresses": "allow_private_addresses",
    "private": "allow_private_addresses",
    "private_addresses": "allow_private_addresses",
}


@dataclass(frozen=True)
class Problem:
    pointer: str  # JSON pointer to the field, "" for the whole document
    message: str
    fix: str

    def render(self, source: str) -> str:
        where = f"{source}: {self.pointer or '/'}"
        return f"{where}: {self.message}. Fix: {self.fix}"


class ConfigError(Exception):
    """A config that cannot be used. `str()` is the full, user-facing explanation."""

    def __init__(self, source: str, problems: Iterable[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(p.render(source) for p in self.problems))


@dataclass(frozen=True)
class RuleSpec:
    """A rule as written by the user, already validated."""

    host: str
    allowed_paths: tuple[str, ...] = ()
    methods: tuple[str, ...] | None = None
    allow_private_addresses: bool = False
    schemes: tuple[str, ...] | None = None


NATIVE = "native"
AIRLOCK = "airlock"


@dataclass(frozen=True)
class NetworkConfig:
    enabled: bool = False
    inherit_defaults: bool = True
    mode: Mode = Mode.MONITOR
    log_to_file: bool = False
    allowed_rules: tuple[RuleSpec, ...] = field(default_factory=tuple)
    #: NATIVE, or AIRLOCK: copilot_here's format, read through runtime.core.airlock
    format: str = NATIVE
    #: For AIRLOCK: the native document it maps to, and where the mapping allows less.
    native: Any = field(default=None, compare=False, repr=False)
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Parsing and validation


def parse_config(text: str, source: str, airlock: bool | None = None) -> NetworkConfig:
    """Parse and validate a network.json document; raise ConfigError naming every problem.

    copilot_here's Airlock format is read too (runtime.core.airlock): when `airlock` is
    True (its own global location), or when None and the document has its keys."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            source,
            [
                Problem(
                    "",
                    f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                    "correct the JSON syntax there (a trailing comma or a missing quote?)",
                )
            ],
        ) from None
    from runtime.core import airlock as airlock_format  # it builds on this module

    if airlock or (airlock is None and airlock_format.is_airlock(data)):
        return airlock_format.read(data, source)
    return validate_config(data, source)


def validate_config(data: Any, source: str) -> NetworkConfig:
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            [
                Problem(
                    "",
                    f"the document must be a JSON object, not {_type_name(data)}",
                    'start from {"enabled": true, "mode": "enforce", "allowed_rules": []}',
                )
            ],
        )
    problems += _unknown_keys(data, TOP_LEVEL_KEYS, "")
    enabled = _bool(data, "enabled", False, "", problems)
    inherit = _bool(data, "inherit_defaults", True, "", problems)
    log_to_file = _bool(data, "log_to_file", False, "", problems)
    mode = data.get("mode", "monitor")
    if mode not in MODES:
        problems.append(
            Problem("/mode", f"{json.dumps(mode)} is not a mode", 'use "monitor" or "enforce"')
        )
    if "$schema" in data and not isinstance(data["$schema"], str):
        problems.append(Problem("/$schema", "must be a string", "give the schema's URL or path"))
    rules: list[RuleSpec] = []
    raw_rules = data.get("allowed_rules", [])
    if not isinstance(raw_rules, list):
        problems.append(
            Problem(
                "/allowed_rules",
                f"must be a list of rules, not {_type_name(raw_rules)}",
                'write [{"host": "example.com"}]',
            )
        )
    else:
        for index, raw in enumerate(raw_rules):
            rule = _validate_rule(raw, f"/allowed_rules/{index}", problems)
            if rule is not None:
                rules.append(rule)
    if problems:
        raise ConfigError(source, problems)
    return NetworkConfig(
        enabled=enabled,
        inherit_defaults=inherit,
        mode=Mode(mode),
        log_to_file=log_to_file,
        allowed_rules=tuple(rules),
    )


def _validate_rule(raw: Any, pointer: str, problems: list[Problem]) -> RuleSpec | None:
    if isinstance(raw, str):
        problems.append(
            Problem(pointer, "a rule must be an object", f'write {{"host": {json.dumps(raw)}}}')
        )
        return None
    if not isinstance(raw, dict):
        problems.append(
            Problem(
                pointer,
                f"a rule must be an object, not {_type_name(raw)}",
                'write {"host": "example.com"}',
            )
        )
        return None
    before = len(problems)
    problems += _unknown_keys(raw, RULE_KEYS, pointer)
    host = raw.get("host")
    schemes = raw.get("schemes")
    if schemes is not None and (
        not isinstance(schemes, list)
        or any(not isinstance(x, str) or x.lower() not in SCHEMES for x in schemes)
        or len({x.lower() for x in schemes}) != len(schemes)
    ):
        problems.append(
            Problem(
                f"{pointer}/schemes",
                f"must be a list of schemes (http, https), not {json.dumps(schemes)}",
                'write "schemes": ["https"] to refuse plain HTTP, or leave it out for both',
            )
        )
    if "host" not in raw:
        problems.append(
            Problem(pointer, "the rule has no host", 'add "host": "example.com" to the rule')
        )
    elif not isinstance(host, str):
        problems.append(
            Problem(
                f"{pointer}/host",
                f"must be a string, not {_type_name(host)}",
                'write "host": "example.com"',
            )
        )
    else:
        _check_placeholders(host, f"{pointer}/host", problems)
        _check_host(_sample(host), f"{pointer}/host", problems)
    paths = raw.get("allowed_paths", [])
    if not isinstance(paths, list):
        problems.append(
            Problem(
                f"{pointer}/allowed_paths",
                f"must be a list of paths, not {_type_name(paths)}",
                'write "allowed_paths": ["/v1/"] ([] allows every path)',
            )
        )
    else:
        for index, path in enumerate(paths):
            where = f"{pointer}/allowed_paths/{index}"
            if isinstance(path, str):
                _check_placeholders(path, where, problems)
                path = _sample(path)
            _check_path(path, where, problems)
    methods = raw.get("methods")
    if methods is not None:
        if not isinstance(methods, list) or not methods:
            problems.append(
                Problem(
                    f"{pointer}/methods",
                    "must be a non-empty list of HTTP methods",
                    'write "methods": ["GET", "HEAD"], or leave it out to allow every method',
                )
            )
        else:
            for index, method in enumerate(methods):
                if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
                    problems.append(
                        Problem(
                            f"{pointer}/methods/{index}",
                            f"{json.dumps(method)} is not an HTTP method",
                            "use one of " + ", ".join(HTTP_METHODS),
                        )
                    )
    private = _bool(raw, "allow_private_addresses", False, pointer, problems)
    if len(problems) > before:
        return None
    return RuleSpec(
        host=host,
        allowed_paths=tuple(paths),
        methods=None if methods is None else tuple(m.upper() for m in methods),
        allow_private_addresses=private,
        schemes=None if schemes is None else tuple(x.lower() for x in schemes),
    )


def _check_host(host: str, pointer: str, problems: list[Problem]) -> None:
    def bad(message: str, use: str) -> None:
        problems.append(Problem(pointer, message, use))

    if "/" in host and "://" not in host and _is_cidr(host.strip()):
        bad(
            f"{json.dumps(host)} is a CIDR range; CIDR ranges are not supported (a rule names "
            "one host, a wildcard of hosts, or one IP address)",
            'list the hosts the agent needs, e.g. "api.example.com", "*.example.com" or "10.0.0.5"',
        )
        return
    if "://" in host or "/" in host:
        url = urlsplit(host if "://" in host else "//" + host)
        name = url.hostname or ""
        path = url.path or ""
        fix = {"host": name}
        if path not in ("", "/"):
            fix["allowed_paths"] = [path]
        bad(
            f"{json.dumps(host)} is a URL, not a host",
            f"write the rule as {json.dumps(fix)}",
        )
        return
    stripped = host.strip()
    if stripped == "*" or stripped == "*.":
        bad(
            "a bare '*' would allow every host",
            'set "enabled": false for allow-all, or list the hosts you need',
        )
        return
    if ":" in stripped and not _looks_ipv6(stripped):
        name = stripped.rsplit(":", 1)[0]
        with contextlib.suppress(HostError):
            name = normalize_host_pattern(name)
        bad(
            f"{json.dumps(host)} has a port; rules match hosts on any port",
            f'write "host": {json.dumps(name)}',
        )
        return
    try:
        normalized = normalize_host_pattern(stripped)
    except HostError as exc:
        use = (
            f'write "host": {json.dumps(exc.suggestion)}'
            if exc.suggestion
            else ('write a host name such as "api.example.com", "*.example.com" or an IP address')
        )
        bad(str(exc), use)
        return
    if normalized.startswith("*.") and _is_public_suffix(normalized[2:]):
        bad(
            f"{json.dumps(host)} would allow every site under the public suffix {normalized[2:]!r}",
            f'name the registrable domain, e.g. "*.example.{normalized[2:]}"',
        )


def _is_cidr(text: str) -> bool:
    address, _, length = text.partition("/")
    if not length.isdigit():
        return False
    try:
        ipaddress.ip_network(f"{address.strip('[]')}/{length}", strict=False)
    except ValueError:
        return False
    return True


def _looks_ipv6(text: str) -> bool:
    return text.startswith("[") or text.count(":") >= 2


@cache
def _public_suffixes() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(only_icann=True)


def _is_public_suffix(domain: str) -> bool:
    return bool(_public_suffixes().is_public(domain))


def _check_path(path: Any, pointer: str, problems: list[Problem]) -> None:
    if not isinstance(path, str):
        problems.append(
            Problem(
                pointer, f"must be a string, not {_type_name(path)}", 'write a path like "/v1/"'
            )
        )
        return
    if path in ("*", "/*"):
        problems.append(
            Problem(
                pointer,
                f"{json.dumps(path)} is how other tools say 'every path'",
                'write "allowed_paths": [] (an empty list allows every path)',
            )
        )
        return
    exact = path.startswith(EXACT)
    if exact:
        path = path[1:]
        if SEGMENT_WILDCARD in path.split("/"):
            problems.append(
                Problem(
                    pointer,
                    f"{json.dumps(EXACT + path)}: an exact path ('=') cannot have '*' segments",
                    f'write "{path}" (without "=") for a pattern',
                )
            )
            return
    if not path.startswith("/"):
        problems.append(
            Problem(pointer, f"{json.dumps(path)} must start with '/'", f'write "/{path}"')
        )
        return
    glued = [seg for seg in path.split("/") if "*" in seg and seg != SEGMENT_WILDCARD]
    if glued:
        head = path.split("*", 1)[0]
        fix = (
            f'for a prefix write "{head}" (an entry ending in "/" covers all below it)'
            if head.endswith("/")
            else f'write "{head}" (it covers {head} and everything below it)'
        )
        problems.append(
            Problem(
                pointer,
                f"{json.dumps(path)}: '*' stands for one whole segment (as in /*/*/info/refs), "
                "not part of one",
                fix,
            )
        )
        return
    if "?" in path or "#" in path or any(c.isspace() for c in path):
        clean = path.split("#", 1)[0].split("?", 1)[0].strip()
        problems.append(
            Problem(
                pointer,
                f"{json.dumps(path)} has a query, fragment or space; paths match without them",
                f'write "{clean}"',
            )
        )
        return
    # Dot segments and empty segments are the policy's to define: a rule path is
    # accepted only when normalising it changes nothing but its escapes.
    if normalize_path(path) != normalize_path_escapes(path):
        problems.append(
            Problem(
                pointer,
                f"{json.dumps(path)} has '.', '..' or empty segments; rules are compared "
                "with normalised paths",
                f'write "{normalize_path(path)}"',
            )
        )


def _unknown_keys(data: Mapping[str, Any], known: tuple[str, ...], pointer: str) -> list[Problem]:
    problems = []
    for key in data:
        if key in known:
            continue
        guess = ALIASES.get(key.lower().replace("-", "_")) or ALIASES.get(key.lower())
        if guess not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            guess = close[0] if close else None
        fix = f'rename it to "{guess}"' if guess else "remove it; known keys: " + ", ".join(known)
        if key == "allow_insecure" and "schemes" in known:
            fix = (
                'write "schemes": ["http", "https"] to allow plain HTTP (true), or '
                '"schemes": ["https"] to refuse it (false)'
            )
        problems.append(Problem(f"{pointer}/{_escape(key)}", f'unknown key "{key}"', fix))
    return problems


def _bool(data: Mapping[str, Any], key: str, default: bool, pointer: str, problems: list[Problem]):
    value = data.get(key, default)
    if not isinstance(value, bool):
        problems.append(
            Problem(
                f"{pointer}/{key}",
                f"must be true or false, not {json.dumps(value)}",
                f'write "{key}": {"true" if value in (1, "true", "yes", "on") else "false"}',
            )
        )
        return default
    return value


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------
# Compilation


# ---------------------------------------------------------------------------
# Placeholders: {{GITHUB_OWNER}} and {{GITHUB_REPO}}, filled from the project's
# origin remote at start. A rule whose placeholders have no value drops out.

PLACEHOLDERS = ("GITHUB_OWNER", "GITHUB_REPO")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
# What GitHub allows: owners are [A-Za-z0-9-], repositories also '.' and '_'.
_VALID_VALUE = {
    "GITHUB_OWNER": re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})"),
    "GITHUB_REPO": re.compile(r"[A-Za-z0-9._-]{1,100}"),
}
_SAMPLE = {"GITHUB_OWNER": "owner", "GITHUB_REPO": "repo"}


def placeholder_values(owner: str | None, repo: str | None) -> dict[str, str]:
    """Checked values for the placeholders; an unusable one is left out (its rules drop)."""
    values = {}
    for name, value in (("GITHUB_OWNER", owner), ("GITHUB_REPO", repo)):
        if value and _VALID_VALUE[name].fullmatch(value) and value not in (".", ".."):
            values[name] = value
    return values


def _sample(text: str) -> str:
    return _PLACEHOLDER.sub(lambda m: _SAMPLE.get(m.group(1), m.group(0)), text)


def _check_placeholders(text: str, pointer: str, problems: list[Problem]) -> None:
    for name in _PLACEHOLDER.findall(text):
        if name not in PLACEHOLDERS:
            problems.append(
                Problem(
                    pointer,
                    f"unknown placeholder {{{{{name}}}}}",
                    "use " + " or ".join(f"{{{{{p}}}}}" for p in PLACEHOLDERS),
                )
            )


def fill(text: str, values: Mapping[str, str]) -> str | None:
    """`text` with its placeholders filled, or None when one has no value."""
    missing = False

    def one(match: re.Match[str]) -> str:
        nonlocal missing
        value = values.get(match.group(1))
        if value is None:
            missing = True
            return ""
        return value

    filled = _PLACEHOLDER.sub(one, text)
    return None if missing else filled


def uses_placeholders(spec: RuleSpec) -> bool:
    return any(_PLACEHOLDER.search(t) for t in (spec.host, *spec.allowed_paths))


def _filled_rule(spec: RuleSpec, values: Mapping[str, str], origin: Origin) -> Rule | None:
    """The rule with its placeholders filled. A path without values drops out; a rule
    whose host, or every one of whose paths, dropped out is None (never widened to
    every path)."""
    host = fill(spec.host, values)
    paths = [p for p in (fill(p, values) for p in spec.allowed_paths) if p is not None]
    if host is None or (spec.allowed_paths and not paths):
        return None
    return make_rule(
        host,
        paths,
        spec.methods,
        origin,
        spec.schemes,
        allow_private_addresses=spec.allow_private_addresses,
    )


def unfilled_entries(
    specs: Iterable[RuleSpec | Mapping[str, Any]], values: Mapping[str, str]
) -> tuple[str, ...]:
    """`host/path` of every rule entry left out because a placeholder has no value."""
    out: list[str] = []
    for spec in specs:
        if isinstance(spec, RuleSpec):
            host, paths = spec.host, tuple(spec.allowed_paths)
        else:
            host, paths = str(spec.get("host", "")), tuple(spec.get("allowed_paths") or ())
        for path in paths or ("",):
            if fill(host, values) is None or (path and fill(str(path), values) is None):
                out.append(f"{host}{path}")
    return tuple(out)


def user_rules(
    config: NetworkConfig, source_file: str, values: Mapping[str, str] | None = None
) -> list[Rule]:
    origin = Origin("user", source_file)
    rules = (_filled_rule(r, values or {}, origin) for r in config.allowed_rules)
    return [rule for rule in rules if rule is not None]


def merge_rules(user: Iterable[Rule], built_in: Iterable[Rule]) -> tuple[Rule, ...]:
    """User rules first; a built-in rule is added unless the user wrote a rule for its host."""
    user = tuple(user)
    overridden = {rule.host for rule in user}
    return user + tuple(rule for rule in built_in if rule.host not in overridden)


def compile_policy(
    config: NetworkConfig,
    source: str,
    built_in: Iterable[Rule] = (),
    values: Mapping[str, str] | None = None,
) -> Policy:
    """The behaviour matrix (README), in one place.

    enabled false -> allow-all (log only if log_to_file); enabled true ->
    rules apply in monitor (logging forced on) or enforce mode.
    """
    if not config.enabled:
        return Policy.build(Mode.ALLOW_ALL, config.log_to_file, (), source)
    rules = user_rules(config, source, values)
    merged = merge_rules(rules, built_in) if config.inherit_defaults else tuple(rules)
    return Policy.build(Mode(config.mode), config.log_to_file, merged, source)


def built_in_rules(
    specs: Iterable[Mapping[str, Any]],
    source: str = "built-in defaults",
    values: Mapping[str, str] | None = None,
) -> tuple[Rule, ...]:
    """The image's built-in rules, validated exactly as a user's rules are; those
    whose placeholders have no value drop out."""
    problems: list[Problem] = []
    checked = [
        _validate_rule(dict(spec), f"/allowed_rules/{index}", problems)
        for index, spec in enumerate(specs)
    ]
    if problems:
        raise ConfigError(source, problems)
    rules = (_filled_rule(r, values or {}, BUILT_IN_ORIGIN) for r in checked if r)
    return tuple(rule for rule in rules if rule is not None)
