"""Placeholders in rules: {{GITHUB_OWNER}} and {{GITHUB_REPO}}, filled from the
project's origin remote at start. Pure: text in, text out.

A rule is validated with sample values in place of its placeholders, and
compiled with the real ones; a path whose placeholder has no value drops out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

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


def sample(text: str) -> str:
    """`text` with sample values, to validate a host or path that holds placeholders."""
    return _PLACEHOLDER.sub(lambda m: _SAMPLE.get(m.group(1), m.group(0)), text)


def unknown_placeholders(text: str) -> list[tuple[str, str]]:
    """(message, fix) for every placeholder the runtime does not fill."""
    return [
        (
            f"unknown placeholder {{{{{name}}}}}",
            "use " + " or ".join(f"{{{{{p}}}}}" for p in PLACEHOLDERS),
        )
        for name in _PLACEHOLDER.findall(text)
        if name not in PLACEHOLDERS
    ]


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


def mentions_placeholder(text: str) -> bool:
    return _PLACEHOLDER.search(text) is not None
