"""What the interceptor forwards keeps its meaning as HTTP/1.1 (runtime.core.wellformed),
and an HTTP/2 body without a length is framed for an HTTP/1.1 upstream (framing.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import RequestHeaders
from mitmproxy.test import tutils

from runtime.container.interceptor import framing
from runtime.core.wellformed import is_token, malformed

FIELDS = [(b"host", b"api.github.com"), (b"user-agent", b"curl/8 \xc3\xa9")]


@pytest.mark.parametrize("method", [b"GET", b"POST", b"PROPFIND", b"M-SEARCH"])
@pytest.mark.parametrize("target", [b"/", b"/repos/x?q=1", b"*", b"/caf\xc3\xa9", b"//a/b"])
def test_requests_clients_send_are_well_formed(method: bytes, target: bytes) -> None:
    assert malformed(method, target, FIELDS) is None


@pytest.mark.parametrize(
    ("method", "target", "fields", "why"),
    [
        (b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\nGET", b"/", FIELDS, "method"),
        (b"GET", b"/a HTTP/1.1\r\nHost: x\r\n\r\nGET /admin", FIELDS, "whitespace"),
        (b"GET", b"/a\tb", FIELDS, "whitespace"),
        (b"GET", b"http://evil.test/x", FIELDS, "not a path"),
        (b"GET", b"evil.test:443", FIELDS, "not a path"),
        (b"GET", b"", FIELDS, "not a path"),
        (b"GET", b"/", [(b"x-a", b"b\r\n\r\nGET /admin HTTP/1.1")], "line break"),
        (b"GET", b"/", [(b"x-a", b"b\nc")], "line break"),
        (b"GET", b"/", [(b"x-a", b"b\rc")], "line break"),
        (b"GET", b"/", [(b"x-a", b"b\x00c")], "line break"),
        (b"GET", b"/", [(b"x a", b"b")], "header name"),
    ],
)
def test_what_http1_would_read_as_another_request_is_malformed(
    method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], why: str
) -> None:
    problem = malformed(method, target, fields)
    assert problem is not None and why in problem


@given(st.binary(max_size=40))
def test_a_value_is_refused_exactly_when_it_holds_cr_lf_or_nul(value: bytes) -> None:
    bad = any(c in value for c in b"\r\n\x00")
    assert (malformed(b"GET", b"/", [(b"x-a", value)]) is not None) is bad


def test_is_token() -> None:
    assert is_token("GET") and is_token(b"M-SEARCH")
    assert not is_token("GET /x") and not is_token("") and not is_token("G\u00e9T")


def _request(version: str, **headers: str):
    request = tutils.treq(http_version=version.encode())
    request.headers.clear()
    for name, value in headers.items():
        request.headers[name.replace("_", "-")] = value
    return request


def test_an_http2_body_without_length_is_sent_chunked_and_the_flow_keeps_its_headers() -> None:
    request = _request("HTTP/2.0", host="x.test")
    event = RequestHeaders(1, request, end_stream=False)
    out = framing.framed(event)
    assert out is not event and out.request.headers["transfer-encoding"] == "chunked"
    assert (out.stream_id, out.end_stream) == (1, False)
    assert "transfer-encoding" not in request.headers  # the flow's request as it came


@pytest.mark.parametrize(
    ("version", "end_stream", "headers"),
    [
        ("HTTP/2.0", True, {}),  # no body follows
        ("HTTP/2.0", False, {"content_length": "5"}),  # framed by its length
        ("HTTP/1.1", False, {}),  # HTTP/1 framing is the client's, checked by mitmproxy
        ("HTTP/1.1", False, {"transfer_encoding": "chunked"}),
    ],
)
def test_other_requests_are_written_as_they_came(
    version: str, end_stream: bool, headers: dict[str, str]
) -> None:
    event = RequestHeaders(1, _request(version, **headers), end_stream=end_stream)
    assert framing.framed(event) is event


def test_install_wraps_the_http1_client_once() -> None:
    framing.install()
    wrapped = _http1.Http1Client.send
    framing.install()
    assert _http1.Http1Client.send is wrapped
