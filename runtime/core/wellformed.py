"""Whether a request keeps its meaning when written out as HTTP/1.1. Pure: no I/O.

The interceptor judges the request it parsed, then writes it to the upstream.
An HTTP/2 request reaches an HTTP/1.1 upstream as text (mitmproxy converts it),
and HTTP/2 carries any byte in a field: a line break in a header value, the
`:path` or the `:method` ends the judged request early, and the upstream reads
what follows as requests nobody judged, to any Host and path. A `:path` in
absolute form (`http://other.example/x`) names another host, which an HTTP/1.1
upstream must honour over the Host header. Such a request is not HTTP the
policy can judge (`not_http`, in every mode).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: RFC 9110 section 5.6.2: a method and a field name are tokens (the one definition:
#: the interceptor's request-line check and the CLI's --method use it too).
TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN = re.compile(TOKEN)
#: RFC 9110 section 5.5 / RFC 9113 section 8.2.1: never in a field value.
_NOT_IN_VALUE = re.compile(rb"[\r\n\x00]")
#: Whitespace and control characters end or corrupt a request line.
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")


def is_token(text: str | bytes) -> bool:
    """Whether `text` is an HTTP token (what a method must be)."""
    data = text.encode("latin-1", "replace") if isinstance(text, str) else text
    return _TOKEN.fullmatch(data) is not None


def malformed(method: bytes, target: bytes, fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why this request would not reach an HTTP/1.1 upstream as the one request judged
    (a short text for the interceptor's log), or None when it would.

    `target` is the path as the client sent it (HTTP/1 origin form, or HTTP/2 :path);
    `fields` the header fields, names and values as received.
    """
    if not is_token(method):
        return f"the method {method[:40]!r} is not a token"
    if target != b"*" and not target.startswith(b"/"):
        # Only origin form (or OPTIONS' `*`) keeps the host the judged one.
        return f"the target {target[:60]!r} is not a path"
    if _NOT_IN_TARGET.search(target):
        return f"the target {target[:60]!r} contains whitespace or a control character"
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return f"the header name {name[:40]!r} is not a token"
        if _NOT_IN_VALUE.search(value):
            return f"the value of header {name[:40]!r} contains a line break or NUL"
    return None
