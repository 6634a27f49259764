"""From a validated config to the policy: placeholders filled, user and built-in
rules merged, the behaviour matrix applied. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from runtime.core.config import ConfigError, NetworkConfig, Problem, RuleSpec, validate_rule
from runtime.core.placeholders import fill, mentions_placeholder
from runtime.core.policy import BUILT_IN_ORIGIN, Mode, Origin, Policy, Rule, make_rule


def uses_placeholders(spec: RuleSpec) -> bool:
    return any(mentions_placeholder(t) for t in (spec.host, *spec.allowed_paths))


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
        ports=spec.ports,
        http=spec.http,
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
    """User rules first; a built-in rule is added unless the user wrote a rule for its
    host that grants the same kind: a user's HTTP rule for a host replaces the built-in
    HTTP rules for it, a user's `ports` rule the built-in `ports` rules (so
    `{"host": "github.com", "ports": [22]}` keeps git over HTTPS to github.com). A user
    rule that allows nothing (`"schemes": []`, no ports) replaces every built-in rule."""
    user = tuple(user)
    http = {rule.host for rule in user if rule.http}
    ports = {rule.host for rule in user if rule.ports}
    everything = {rule.host for rule in user if rule.schemes == frozenset() and not rule.ports}

    def replaced(rule: Rule) -> bool:
        return (
            rule.host in everything
            or (rule.http and rule.host in http)
            or (bool(rule.ports) and rule.host in ports)
        )

    return user + tuple(rule for rule in built_in if not replaced(rule))


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
        validate_rule(dict(spec), f"/allowed_rules/{index}", problems)
        for index, spec in enumerate(specs)
    ]
    if problems:
        raise ConfigError(source, problems)
    rules = (_filled_rule(r, values or {}, BUILT_IN_ORIGIN) for r in checked if r)
    return tuple(rule for rule in rules if rule is not None)
