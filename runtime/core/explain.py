"""Human- and agent-readable explanations of decisions.

The interceptor's 403 body and the host CLI's --network-check print the same
text, so what an agent reads in a blocked response is what a user sees when
they ask.
"""

from __future__ import annotations

import json

from runtime.core.credentials import TOKEN_HOSTS
from runtime.core.policy import Decision, Reason, suggested_rule

REASON_TEXT = {
    Reason.ALLOW_ALL: "the secure proxy is in allow-all mode (enabled is false)",
    Reason.RULE_MATCH: "an allowed rule matches",
    Reason.HOST_NOT_ALLOWED: "no allowed rule covers this host",
    Reason.PATH_NOT_ALLOWED: "the host is allowed, but not this path",
    Reason.METHOD_NOT_ALLOWED: "the host and path are allowed, but not this method",
    Reason.HOST_MISMATCH: "the TLS server name (SNI) and the Host header name different hosts "
    "(domain fronting)",
    Reason.NOT_HTTP: "only HTTP requests and WebSockets can be judged; switching this "
    "connection to another protocol is refused in every mode",
    Reason.LOG_UNAVAILABLE: "the traffic log cannot be written (disk full or I/O error) and "
    "this policy logs every request, so nothing is sent unlogged",
    Reason.CREDENTIAL_LEAK: "the request carries the sign-in token's placeholder (the agent's "
    "GH_TOKEN / GITHUB_TOKEN) to a host that never gets the token; it is refused in every mode",
}


def rule_label(decision: Decision) -> str:
    if decision.rule is None:
        return "none"
    return f"{decision.rule.host} ({decision.rule.origin.label})"


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
    if decision.blocked or decision.violation:
        if decision.reason is Reason.HOST_MISMATCH:
            lines.append("fix: send the request with matching SNI and Host header")
        elif decision.reason is Reason.NOT_HTTP:
            # No rule can help: the proxy has nothing to judge once the protocol changes.
            lines.append("fix: none in the config; use plain HTTP(S) or a WebSocket")
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
        else:
            rule = json.dumps(suggested_rule(decision))
            lines.append(f'fix: add this rule to "allowed_rules" in {config_source}: {rule}')
            if decision.rule is not None:
                lines.append(f"     (it replaces the rule for {decision.rule.host})")
    return "\n".join(lines) + "\n"
