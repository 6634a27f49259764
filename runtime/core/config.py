"""The `network.json` model: parsing, validation with actionable errors, compilation.

Pure: text and values in, a config or a list of problems out. Reading files is
`runtime.resolve`'s job. Every problem names the field (a JSON pointer) and
the fix, in the manner of smokescreen's ACL errors.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from runtime.core.hosts import HostError, normalize_host_pattern
from runtime.core.paths import EXACT, SEGMENT_WILDCARD, normalize_path, normalize_path_escapes
from runtime.core.placeholders import sample, unknown_placeholders
from runtime.core.policy import Mode

TOP_LEVEL_KEYS = (
    "$schema",
    "enabled",
    "inherit_defaults",
    "mode",
    "log_to_file",
    "allowed_rules",
    "workers",
)
RULE_KEYS = ("host", "allowed_paths", "methods", "schemes", "allow_private_addresses", "ports")
#: The keys that grant HTTP(S): a rule with `ports` and none of these grants only its ports.
HTTP_KEYS = ("allowed_paths", "methods", "schemes")
#: Ports a rule may not name, and why.
RESERVED_PORTS = {
    80: "HTTP always goes through the interceptor, judged by host, path and method",
    443: "HTTPS always goes through the interceptor, judged by host, path and method",
    53: "DNS always goes to the DNS guard",
}
SCHEMES = ("http", "https")
#: The modes a config may name: the core's own vocabulary (allow-all comes from enabled).
MODES = (Mode.MONITOR.value, Mode.ENFORCE.value)
#: "workers": interceptor processes. "auto" is the container's cores, at most AUTO_WORKERS_MAX
#: (resolved in the container); an explicit number at most MAX_WORKERS (ports 58080..+N-1).
AUTO = "auto"
AUTO_WORKERS_MAX = 4
MAX_WORKERS = 16
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
    "port": "ports",
    "tcp_ports": "ports",
    "tcp_port": "ports",
    "allowed_ports": "ports",
    "tcp": "ports",
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
    "worker": "workers",
    "numprocs": "workers",
    "processes": "workers",
    "procs": "workers",
    "interceptors": "workers",
    "threads": "workers",
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
    ports: tuple[int, ...] = ()
    #: False when the rule has `ports` and no key of HTTP_KEYS: it grants no HTTP.
    http: bool = True


NATIVE = "native"
AIRLOCK = "airlock"


@dataclass(frozen=True)
class NetworkConfig:
    enabled: bool = False
    inherit_defaults: bool = True
    mode: Mode = Mode.MONITOR
    log_to_file: bool = False
    allowed_rules: tuple[RuleSpec, ...] = field(default_factory=tuple)
    #: interceptor processes; None: "auto" (the container's cores, at most AUTO_WORKERS_MAX)
    workers: int | None = None
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
    workers = _workers(data, problems)
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
            rule = validate_rule(raw, f"/allowed_rules/{index}", problems)
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
        workers=workers,
    )


def _workers(data: Mapping[str, Any], problems: list[Problem]) -> int | None:
    """`workers`: a whole number 1..MAX_WORKERS, or "auto" (None, the default)."""
    value = data.get("workers", AUTO)
    if value == AUTO:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    fix = f'write "workers": "auto" (the cores, at most {AUTO_WORKERS_MAX}) or 1-{MAX_WORKERS}'
    if isinstance(value, str) and value.strip().isdigit():
        number = min(max(int(value.strip()), 1), MAX_WORKERS)
        fix = f'write "workers": {number} (a number, not a string)'
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        fix = f'write "workers": {min(max(int(value), 1), MAX_WORKERS)}'
    problems.append(
        Problem(
            "/workers",
            f'must be "auto" or a whole number of interceptor processes from 1 to '
            f"{MAX_WORKERS}, not {json.dumps(value)}",
            fix,
        )
    )
    return None


def validate_rule(raw: Any, pointer: str, problems: list[Problem]) -> RuleSpec | None:
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
        problems += [Problem(f"{pointer}/host", m, f) for m, f in unknown_placeholders(host)]
        _check_host(sample(host), f"{pointer}/host", problems)
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
                problems += [Problem(where, m, f) for m, f in unknown_placeholders(path)]
                path = sample(path)
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
    ports = _check_ports(raw.get("ports"), f"{pointer}/ports", problems) if "ports" in raw else ()
    if len(problems) > before:
        return None
    return RuleSpec(
        host=host,
        allowed_paths=tuple(paths),
        methods=None if methods is None else tuple(m.upper() for m in methods),
        allow_private_addresses=private,
        schemes=None if schemes is None else tuple(x.lower() for x in schemes),
        ports=ports,
        http=not ports or any(key in raw for key in HTTP_KEYS),
    )


def _check_ports(value: Any, pointer: str, problems: list[Problem]) -> tuple[int, ...]:
    """`ports`: a non-empty list of TCP ports 1-65535, none of RESERVED_PORTS."""
    fix = 'write "ports": [22] (a list of TCP port numbers)'
    if not isinstance(value, list) or not value:
        problems.append(
            Problem(pointer, f"must be a non-empty list of TCP ports, not {json.dumps(value)}", fix)
        )
        return ()
    out: list[int] = []
    for index, port in enumerate(value):
        where = f"{pointer}/{index}"
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            problems.append(Problem(where, f"{json.dumps(port)} is not a TCP port (1-65535)", fix))
        elif port in RESERVED_PORTS:
            problems.append(
                Problem(
                    where,
                    f"port {port} cannot be opened by a rule: {RESERVED_PORTS[port]}",
                    "remove it from ports"
                    + ("; allowed_paths and methods decide HTTP(S)" if port != 53 else ""),
                )
            )
        elif port not in out:
            out.append(port)
    return tuple(out)


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
            import difflib  # only for a wrong key: every program imports this module

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
