"""Human- and agent-readable explanations of decisions.

The interceptor's 403 body and the host CLI's --network-check print the same
text, so what an agent reads in a blocked response is what a user sees when
they ask.
"""

from __future__ import annotations

import json

from runtime.core.addresses import refused_range
from runtime.core.credentials import TOKEN_HOSTS
from runtime.core.policy import (
    BUILT_IN,
    Decision,
    Mode,
    Policy,
    Reason,
    Rule,
    suggested_rule,
    suggested_rules,
)

REASON_TEXT = {
    Reason.ALLOW_ALL: "the secure proxy is in allow-all mode (enabled is false)",
    Reason.RULE_MATCH: "an allowed rule matches",
    Reason.HOST_NOT_ALLOWED: "no allowed rule covers this host",
    Reason.PATH_NOT_ALLOWED: "the host is allowed, but not this path",
    Reason.METHOD_NOT_ALLOWED: "the host and path are allowed, but not this method",
    Reason.SCHEME_NOT_ALLOWED: "the rule for this host does not allow this scheme (its "
    '"schemes"; plain HTTP is refused where only "https" is listed)',
    Reason.HOST_MISMATCH: "the TLS server name (SNI) and the Host header name different hosts "
    "(domain fronting)",
    Reason.NOT_HTTP: "only HTTP requests and WebSockets can be judged; switching this "
    "connection to another protocol, or a request an HTTP/1.1 upstream would read as "
    "another (a line break or NUL in a header, a method that is not a token, a target "
    "that is not a path), is refused in every mode",
    Reason.LOG_UNAVAILABLE: "the traffic log cannot be written (disk full or I/O error) and "
    "this policy logs every request, so nothing is sent unlogged",
    Reason.PRIVATE_ADDRESS: "the host is allowed, but it resolves to an address off the "
    "internet (loopback, private, link-local such as the cloud metadata service, ...), "
    "which a rule must allow by name: a DNS answer pointing there would reach services "
    "of the container, the host or the local network",
    Reason.CREDENTIAL_LEAK: "the request carries the sign-in token's placeholder (the agent's "
    "GH_TOKEN / GITHUB_TOKEN) to a host that never gets the token; it is refused in every mode",
}


def rule_text(rule: Rule) -> str:
    """One rule as a user reads it: its paths and methods."""
    paths = json.dumps([e.text for e in rule.allowed_paths]) if rule.allowed_paths else "every path"
    methods = ", ".join(sorted(rule.methods)) if rule.methods is not None else "every method"
    return f"{paths} {methods}"


def rule_label(decision: Decision) -> str:
    """The rule that decided, named by host, paths, methods and origin; for a refusal
    by path, every rule of the host that was tried (none of them allows the path)."""
    rule = decision.rule
    if rule is None:
        return "none"
    tried = decision.host_rules if decision.reason is Reason.PATH_NOT_ALLOWED else ()
    if len(tried) > 1:
        each = "; ".join(rule_text(r) for r in tried)
        return f"{rule.host} ({rule.origin.label}, {len(tried)} rules, none allows it: {each})"
    return f"{rule.host} {rule_text(rule)} ({rule.origin.label})"


def explain(decision: Decision, method: str, url: str, config_source: str) -> str:
    """Plain text: what was decided, why, and what to change."""
    verdict = {
        "block": "BLOCKED",
        "violation": "ALLOWED (monitor mode: this would be blocked in enforce mode)",
        "allow": "ALLOWED",
    }[decision.action.value]
    lines = [
        f"{verdict}: {method} {url}",
        f"reason: {decision.reason.value}: {REASON_TEXT[decision.reason]}",
        f"mode: {decision.mode.value}",
        f"rule: {rule_label(decision)}",
        f"config: {config_source}",
    ]
    if decision.reason is Reason.PRIVATE_ADDRESS and decision.address is not None:
        lines.append(f"address: {decision.address} ({refused_range(decision.address)})")
    if decision.blocked or decision.violation:
        if decision.reason is Reason.HOST_MISMATCH:
            lines.append("fix: send the request with matching SNI and Host header")
        elif decision.reason is Reason.NOT_HTTP:
            # No rule can help: the proxy has nothing to judge once the protocol changes.
            lines.append("fix: none in the config; send well-formed HTTP(S) or a WebSocket")
        elif decision.reason is Reason.CREDENTIAL_LEAK:
            # No rule can help: the token goes only to GitHub's and Copilot's hosts.
            lines.append(
                "fix: none in the config; the token is sent only to "
                + ", ".join(TOKEN_HOSTS)
                + " (drop it from this request)"
            )
        elif decision.reason is Reason.LOG_UNAVAILABLE:
            lines.append(
                "fix: free space where the traffic log is written (/logs in the container: "
                "the logs directory on the host), then retry; requests work again as soon "
                "as a line can be written"
            )
        elif decision.reason is Reason.PRIVATE_ADDRESS:
            rule = json.dumps(suggested_rule(decision))
            lines.append(
                f"fix: only if {decision.host} really is at {decision.address} (otherwise this "
                "DNS answer is the attack being refused), add this rule to "
                f'"allowed_rules" in {config_source}: {rule}'
            )
            if decision.rule is not None:
                lines.append(f"     (it replaces the rule for {decision.rule.host})")
        else:
            rules = suggested_rules(decision)
            if len(rules) == 1:
                rule = json.dumps(rules[0])
                lines.append(f'fix: add this rule to "allowed_rules" in {config_source}: {rule}')
            else:
                text = ", ".join(json.dumps(r) for r in rules)
                lines.append(f'fix: add these rules to "allowed_rules" in {config_source}: {text}')
                lines.append(
                    f"     (a rule of yours for {rules[-1]['host']} replaces every built-in "
                    f"rule for it: the first {len(rules) - 1} are the built-in ones, kept)"
                )
            if decision.rule is not None and decision.rule.origin.kind == BUILT_IN:
                lines.append(
                    "     (or leave it refused: the built-in rules allow only what the Copilot "
                    "CLI and git need)"
                )
    return "\n".join(lines) + "\n"


def explain_port(
    policy: Policy, host: str, port: int, url: str, config_source: str
) -> tuple[bool, str]:
    """(whether the box may open TCP `port` to `host`, plain text saying why): the
    answer for a port other than HTTP(S) and DNS, which only a rule's `ports` opens.

    Allow-all touches no other traffic; with rules (monitor or enforce alike) a port is
    open to the host's answered addresses exactly when Policy.ports_for names it."""
    if policy.mode is Mode.ALLOW_ALL:
        return True, "\n".join(
            [
                f"ALLOWED: TCP {host}:{port} ({url})",
                "reason: allow_all: rules are disabled; traffic other than HTTP(S) is untouched",
                f"mode: {policy.mode.value}",
                f"config: {config_source}",
            ]
        ) + "\n"
    ports = policy.ports_for(host)
    rules = [r for r in policy.port_rules_for_host(host) if port in r.ports]
    if rules:
        rule = rules[0]
        opened = ", ".join(str(p) for p in sorted(rule.ports))
        return True, "\n".join(
            [
                f"ALLOWED: TCP {host}:{port} ({url})",
                "reason: rule_match: the firewall opens this port to the addresses the DNS "
                "guard answers for the host, for the answer's lifetime (a name from /etc/hosts "
                "opens nothing)",
                f"mode: {policy.mode.value}",
                f"rule: {rule.host} ports {opened} ({rule.origin.label})",
                f"config: {config_source}",
            ]
        ) + "\n"
    fix = {"host": host, "ports": sorted({*ports, port})}
    return False, "\n".join(
        [
            f"BLOCKED: TCP {host}:{port} ({url})",
            "reason: port_not_allowed: no rule opens this port for the host; TCP other than "
            "HTTP(S) is refused unless a rule's ports name it"
            + (
                " (monitor mode too: the firewall cannot judge it)"
                if policy.mode is Mode.MONITOR
                else ""
            ),
            f"mode: {policy.mode.value}",
            "rule: "
            + (
                f"{policy.port_rules_for_host(host)[0].host} ports "
                + ", ".join(str(p) for p in sorted(ports))
                if ports
                else "none"
            ),
            f"config: {config_source}",
            f'fix: add this rule to "allowed_rules" in {config_source}: {json.dumps(fix)}',
        ]
    ) + "\n"
