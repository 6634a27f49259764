"""copilot_here's Airlock `network.json`, read as this project's native model: pure.

copilot_here (the upstream project this CLI follows) has a network feature of its
own, Airlock, with a `network.json` of the same name and a similar shape. A user
coming from it keeps their file: it is recognised by its keys and mapped, rule by
rule, to the native model. Where the native model cannot say exactly the same, the
mapping takes the narrower reading (it may allow less, never more) and says so in
a note. The table (README, "Airlock configs"):

    Airlock                               native
    enabled                               enabled
    mode (absent: enforce, as copilot_here's CLI writes it for its proxy)   mode
    enable_logging (absent: off; monitor logs anyway)                 log_to_file
    inherit_default_rules (default true)  inherit_defaults (this project's built-in rules)
    rule host (exact, any case)           host; a host with '*' matches nothing there: dropped
    a later rule for the same host        dropped (Airlock uses the first one only)
    allowed_paths "*" (or "/*")           every path: allowed_paths []
    "/prefix/*" (ends in '/' + '*')       "/prefix/" (the same)
    "/prefix*" (a raw string prefix)      "/prefix" (it and below it at a '/': narrower)
    "/exact"                              "=/exact" (that path only)
    allowed_paths [] (no path)            no rule; with inherit_default_rules, a rule that
                                          allows nothing ("schemes": []), so the built-in
                                          rules for that host stay replaced, as there
    allow_insecure false (or absent)      "schemes": ["https"] (plain HTTP refused)
    allow_insecure true                   both schemes

A path no request can match there (not starting with '/', a query, a literal '*',
'.' or '..' segments) is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from runtime.core.config import (
    AIRLOCK,
    EXACT,
    ConfigError,
    NetworkConfig,
    Problem,
    _bool,
    _check_host,
    _check_path,
    _type_name,
    _unknown_keys,
    validate_config,
)
from runtime.core.placeholders import sample

TOP_KEYS = ("enabled", "enable_logging", "inherit_default_rules", "mode", "allowed_rules")
RULE_KEYS = ("host", "allowed_paths", "allow_insecure")
#: Keys only Airlock has: one of them (and none of NATIVE_ONLY) makes a file Airlock's.
AIRLOCK_ONLY = ("enable_logging", "inherit_default_rules")
NATIVE_ONLY = ("inherit_defaults", "log_to_file", "$schema")
NATIVE_RULE_ONLY = ("methods", "schemes")
#: copilot_here's CLI writes "enforce" for a file without a mode (its proxy alone would monitor).
DEFAULT_MODE = "enforce"
EVERY_PATH = ("*", "/*")


def is_airlock(data: Any) -> bool:
    """Whether a parsed document is Airlock's: one of its own keys, none of ours."""
    if not isinstance(data, dict):
        return False
    rules = data.get("allowed_rules")
    rules = [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []
    if any(k in data for k in NATIVE_ONLY) or any(k in r for r in rules for k in NATIVE_RULE_ONLY):
        return False
    if any(str(p).startswith(EXACT) for r in rules for p in _list(r.get("allowed_paths"))):
        return False
    return any(k in data for k in AIRLOCK_ONLY) or any("allow_insecure" in r for r in rules)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def read(data: Any, source: str) -> NetworkConfig:
    """The Airlock document as a NetworkConfig (format AIRLOCK, with its native
    equivalent and notes); ConfigError naming the Airlock field and the fix."""
    native, notes = to_native(data, source)
    config = validate_config(native, source)
    return replace(config, format=AIRLOCK, native=native, notes=tuple(notes))


def to_native(data: Any, source: str) -> tuple[dict[str, Any], list[str]]:
    """The native document an Airlock document means, and the notes on what it narrows."""
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
    problems: list[Problem] = _unknown_keys(data, TOP_KEYS, "")
    for p in problems:
        if p.pointer == "/log_to_file":
            problems[problems.index(p)] = replace(p, fix='rename it to "enable_logging"')
        if p.pointer == "/inherit_defaults":
            problems[problems.index(p)] = replace(p, fix='rename it to "inherit_default_rules"')
    notes: list[str] = []
    enabled = _bool(data, "enabled", False, "", problems)
    logging = _bool(data, "enable_logging", False, "", problems)
    inherit = _bool(data, "inherit_default_rules", True, "", problems)
    mode = data.get("mode", DEFAULT_MODE)
    if mode not in ("monitor", "enforce"):
        problems.append(
            Problem("/mode", f"{json.dumps(mode)} is not a mode", 'use "monitor" or "enforce"')
        )
    if "mode" not in data:
        notes.append(
            f'/mode: not set; read as "{DEFAULT_MODE}", as copilot_here\'s CLI runs the file '
            "(its proxy alone would monitor)"
        )
    rules: list[dict[str, Any]] = []
    raw_rules = data.get("allowed_rules", [])
    if not isinstance(raw_rules, list):
        problems.append(
            Problem(
                "/allowed_rules",
                f"must be a list of rules, not {_type_name(raw_rules)}",
                'write [{"host": "example.com", "allowed_paths": ["*"]}]',
            )
        )
        raw_rules = []
    hosts: set[str] = set()
    for index, raw in enumerate(raw_rules):
        rule = _rule(raw, f"/allowed_rules/{index}", inherit, hosts, problems, notes)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise ConfigError(source, problems)
    native: dict[str, Any] = {
        "enabled": enabled,
        "inherit_defaults": inherit,
        "mode": mode,
        "log_to_file": logging,
        "allowed_rules": rules,
    }
    return native, notes


def _rule(
    raw: Any,
    pointer: str,
    inherit: bool,
    hosts: set[str],
    problems: list[Problem],
    notes: list[str],
) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        problems.append(
            Problem(
                pointer,
                f"a rule must be an object, not {_type_name(raw)}",
                'write {"host": "example.com", "allowed_paths": ["*"]}',
            )
        )
        return None
    before = len(problems)
    problems += _unknown_keys(raw, RULE_KEYS, pointer)
    host = raw.get("host")
    if not isinstance(host, str):
        problems.append(
            Problem(f"{pointer}/host", "must be a string naming one host", 'write "host": "a.test"')
        )
        return None
    paths = raw.get("allowed_paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        problems.append(
            Problem(
                f"{pointer}/allowed_paths",
                "must be a list of path strings",
                'write "allowed_paths": ["*"] for every path',
            )
        )
    insecure = _bool(raw, "allow_insecure", False, pointer, problems)
    if len(problems) > before:
        return None
    key = host.strip().lower().rstrip(".")
    if "*" in host:
        notes.append(
            f"{pointer}: host {json.dumps(host)}: Airlock compares hosts exactly, so it "
            "matches no request: dropped"
        )
        hosts.add(key)
        return None
    _check_host(sample(host), f"{pointer}/host", problems)
    if len(problems) > before:
        return None
    if key in hosts:
        notes.append(
            f"{pointer}: a second rule for {host}: Airlock uses the first one only: dropped"
        )
        return None
    hosts.add(key)
    mapped = [_path(p, f"{pointer}/allowed_paths/{i}", notes) for i, p in enumerate(paths)]
    rule: dict[str, Any] = {"host": host}
    if any(m == "" for m in mapped):
        rule["allowed_paths"] = []  # every path
    else:
        kept = [m for m in mapped if m is not None]
        if not kept:
            return _allows_nothing(host, pointer, inherit, notes)
        rule["allowed_paths"] = list(dict.fromkeys(kept))
    if not insecure:
        rule["schemes"] = ["https"]
    return rule


def _allows_nothing(host: str, pointer: str, inherit: bool, notes: list[str]) -> dict | None:
    if not inherit:
        notes.append(f"{pointer}: no path allowed for {host} (Airlock: [] is no path): dropped")
        return None
    notes.append(
        f"{pointer}: no path allowed for {host} (Airlock: [] is no path): a rule that allows "
        'nothing ("schemes": []), so the built-in rules for that host stay replaced'
    )
    return {"host": host, "schemes": []}


def _path(path: str, pointer: str, notes: list[str]) -> str | None:
    """The native entry for one Airlock path: "" for every path, None when dropped."""
    if path in EVERY_PATH:
        return ""
    if path.endswith("*"):
        prefix = path[:-1]
        if prefix == "/":
            return ""
        entry = prefix
        if not prefix.endswith("/"):
            notes.append(
                f"{pointer}: {json.dumps(path)} (a raw prefix) is read as {json.dumps(prefix)}: "
                "that path and what lies below it at a '/' (Airlock: any path starting so)"
            )
    else:
        entry = EXACT + path
    checked: list[Problem] = []
    _check_path(sample(entry), pointer, checked)
    if checked or "*" in entry:
        notes.append(
            f"{pointer}: {json.dumps(path)} can match no request path as Airlock compares "
            "it (paths start with '/', carry no query, '.', '..' or literal '*'): dropped"
        )
        return None
    return entry


def describe(config: NetworkConfig) -> Mapping[str, Any] | None:
    """The native document of an Airlock config (for --network-show / --network-migrate)."""
    return config.native if config.format == AIRLOCK else None
