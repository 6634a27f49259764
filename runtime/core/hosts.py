"""Host names as the policy compares them: normalised once, IDNA for non-ASCII only.

Pure: no I/O. `normalize_host` is the one place a name becomes comparable
(case, one trailing dot, punycode, IP literals in their canonical form).
"""

from __future__ import annotations

import functools
import ipaddress
import re


class HostError(ValueError):
    """A host that cannot be used in a rule or judged; `suggestion` is the form to use."""

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


_ASCII_HOST = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")
#: Without a ':' only dotted decimal can be an IP literal (ipaddress accepts no other IPv4 form).
_NOT_DOTTED_DECIMAL = re.compile(r"[^0-9.]")


def ip_literal(text: str) -> str | None:
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
    ip = ip_literal(text)
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
    import idna  # here: ~5 ms to import, for the rare non-ASCII name (every process imports us)

    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise HostError(f"{raw!r} is not a valid host name ({exc})") from None


def normalize_host_pattern(raw: str) -> str:
    """Canonical form of a rule's host: a host, an IP literal, or `*.` + a host."""
    text = raw.strip()
    if text.startswith("*."):
        rest = normalize_host(text[2:])
        if ip_literal(rest) is not None:
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
