"""An HTTP/2 (or 3) request body reaches an HTTP/1.1 upstream framed.

HTTP/2 frames a body itself, so clients often send one without `content-length`.
mitmproxy writes such a request to an HTTP/1.1 upstream as it came, headers and
then the body's bytes with no framing at all: the upstream takes the request to
have no body and reads the body as the next requests on the connection, requests
nobody judged or logged (to any Host, any path). Every allowed body streams (the
traffic log counts it), so the headers leave before the body's length is known.

`install` (called by `make_addons`) wraps mitmproxy's HTTP/1 client once: a request that came
over HTTP/2 or 3 with a body to follow and no `content-length` is written with
`transfer-encoding: chunked`, the framing HTTP/1.1 has for a body of unknown
length (RFC 9112 section 7.1), and mitmproxy's own client then chunks each piece
of it and ends it with the last chunk. The flow's request is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import RequestHeaders

_MARK = "_secure_proxy_frames_h2_bodies"


def framed(event: Any) -> Any:
    """The event to write: for a request from HTTP/2 or 3 with a body to follow and no
    length, its headers with `transfer-encoding: chunked` (a copy); else the event."""
    if not isinstance(event, RequestHeaders) or event.end_stream:
        return event
    request = event.request
    if not (request.is_http2 or request.is_http3):
        return event
    if "content-length" in request.headers or "transfer-encoding" in request.headers:
        # HTTP/2 checks a content-length against the DATA received (h2 refuses a
        # mismatch), and has no transfer-encoding (h2 refuses the field).
        return event
    copy = request.copy()
    copy.headers["transfer-encoding"] = "chunked"
    return RequestHeaders(event.stream_id, copy, event.end_stream, event.replay_flow)


def install() -> None:
    """Wrap `Http1Client.send` once (idempotent)."""
    client = _http1.Http1Client
    if getattr(client.send, _MARK, False):
        return
    original: Callable[[Any, Any], Generator[Any, Any, None]] = client.send

    def send(self: Any, event: Any) -> Generator[Any, Any, None]:
        return (yield from original(self, framed(event)))

    setattr(send, _MARK, True)
    client.send = send  # type: ignore[method-assign]
