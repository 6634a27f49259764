"""The interceptor: mitmproxy in transparent mode with the policy addons.

Small addons, one concern each, in the order mitmproxy calls them:

- HttpOnly: at `next_layer`, lets a connection become only TLS (once) and then
  HTTP; anything else mitmproxy would relay as raw TCP/UDP (bytes that are not
  HTTP, a CRLF before the request line, DNS, QUIC) is closed and logged as
  `not_http`. `rawtcp` is off as well; this is the second lock.
- UpgradeGuard: a request asking to switch to a protocol other than WebSocket
  is refused (`not_http`); h2c upgrade headers are dropped; a `101` that does
  not start a WebSocket mitmproxy can judge frame by frame is killed.
- PolicyGate: judges every request (each request of a keep-alive connection,
  every HTTP/2 stream, WebSocket upgrades, plain HTTP) with the policy core at
  `requestheaders` -- before any byte of the request can reach upstream, even
  when the body is streamed -- and answers blocked ones with a 403.
- UpstreamPinning: sends allowed requests to the judged name, resolved by the
  proxy, never to the IP the client dialled.
- TrafficLogger: one JSON line per request, when the response completes or the
  request fails (runtime.trafficlog holds the schema).
- PolicyReloader: SIGHUP re-reads policy.json and swaps the policy in one step.
- Readiness: publishes the CA certificate, then the readiness marker, once
  mitmproxy is listening.

`main()` is the console script `secure-proxy-interceptor`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from mitmproxy import ctx, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer
from mitmproxy.proxy.mode_specs import TransparentMode

from runtime import fsutil, paths
from runtime.core.explain import explain
from runtime.core.policy import (
    Action,
    Decision,
    HostError,
    Mode,
    Policy,
    Reason,
    Request,
    normalize_host,
)
from runtime.resolve import read_policy
from runtime.trafficlog import TrafficLogWriter, make_record

METADATA_KEY = "secure_proxy"
DECISION_HEADER = "X-Secure-Proxy-Decision"
CA_CERT_NAME = paths.CA_CERT_NAME
UPSTREAM_BUNDLE_NAME = "upstream-trust.pem"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STREAM_LARGE_BODIES = "1m"
STREAM_LARGE_BODY_BYTES = 1024 * 1024

#: Fail closed when no policy could ever be loaded: nothing is allowed.
NO_POLICY = Policy.build(Mode.ENFORCE, True, (), "no policy loaded (interceptor misconfigured)")


def default_confdir() -> Path:
    """mitmproxy's confdir (CA key inside). supervisord sets no HOME, so never ~/.mitmproxy."""
    confdir = getattr(paths, "confdir", None)
    if confdir is not None:
        return confdir()
    return Path(os.environ.get("SECURE_PROXY_CONFDIR", "/var/lib/secure-proxy/mitmproxy"))


# ---------------------------------------------------------------------------
# Per-request state


class _Counter:
    """A stream callable that passes chunks through and counts their bytes."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.total += len(chunk)
        return chunk


@dataclass(slots=True)
class Verdict:
    """What the gate decided for one flow, and what the logger needs at the end."""

    decision: Decision
    policy: Policy
    port: int
    upstream_host: str
    started: float
    invalid: bool = False  # mitmproxy rejected the request itself (the client got a 400)
    logged: bool = False
    sent_out: _Counter = field(default_factory=_Counter)
    sent_in: _Counter = field(default_factory=_Counter)


def verdict_of(flow: http.HTTPFlow) -> Verdict | None:
    return flow.metadata.get(METADATA_KEY)


def _original_destination(flow: http.HTTPFlow) -> tuple[str, int]:
    """The address the client dialled. In transparent mode mitmproxy stores it as sockname."""
    if isinstance(flow.client_conn.proxy_mode, TransparentMode) and flow.client_conn.sockname:
        host, port = flow.client_conn.sockname[:2]
        return str(host), int(port)
    return flow.request.host, flow.request.port


def _scheme(flow: http.HTTPFlow) -> str:
    """http or https. A request mitmproxy could not parse as one of ours (a CONNECT
    sent to the transparent port) has none: then the client connection says."""
    return flow.request.scheme or ("https" if flow.client_conn.tls_established else "http")


def to_core_request(flow: http.HTTPFlow) -> tuple[Request, int]:
    """The policy core's view of a flow (and the port dialled)."""
    dialled, port = _original_destination(flow)
    request = Request(
        method=flow.request.method,
        path=flow.request.path,
        scheme=_scheme(flow),
        port=port,
        sni=flow.client_conn.sni or None,
        # HTTP/2: the :authority pseudo-header, else Host (mitmproxy maps both).
        host_header=flow.request.host_header or None,
        dialled=dialled,
        # HTTP/1 absolute-form target (or HTTP/2 :authority again): must agree too.
        authority=flow.request.authority or None,
    )
    return request, port


def _upstream_host(decision: Decision, dialled: str | None) -> str:
    """The name to connect to: the judged host, resolved by the proxy."""
    try:
        return normalize_host(decision.host)
    except HostError:
        # Only reachable when the request names no usable host and the policy let it
        # through anyway (allow-all or monitor): then the dialled address is all we have.
        return dialled or decision.host


def block_response(
    decision: Decision, method: str, scheme: str, port: int, source: str
) -> http.Response:
    """403 with the explanation an agent can act on (the same text as `--network-check`)."""
    host = f"[{decision.host}]" if ":" in decision.host else decision.host
    default = {"http": 80, "https": 443}.get(scheme)
    authority = host if port == default else f"{host}:{port}"
    url = f"{scheme}://{authority}{decision.path}"
    body = explain(decision, method, url, source).encode("utf-8")
    return http.Response.make(
        403,
        body,
        {
            "Content-Type": "text/plain; charset=utf-8",
            DECISION_HEADER: f"block; reason={decision.reason.value}",
            "Cache-Control": "no-store",
        },
    )


# ---------------------------------------------------------------------------
# Addons


def not_http_decision(policy: Policy, host: str, path: str | None) -> Decision:
    """A block in every mode, monitor and allow-all included: what follows cannot be judged."""
    return Decision(Action.BLOCK, Reason.NOT_HTTP, policy.mode, host, path or "/")


#: An HTTP/1 request line (RFC 9112 section 3): method token, target, version.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]\r?\n")
#: What a request line can look like before its end has arrived.
_REQUEST_LINE_START = re.compile(_TOKEN + rb"(?: [^\x00-\x20\x7f]*(?: [HTP/0-9.]*\r?)?)?")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: A first line longer than this is not waited for.
MAX_REQUEST_LINE = 64 * 1024


def starts_like_http(data: bytes, h2: bool) -> bool | None:
    """Whether a client's first bytes start an HTTP request: True, False, or None (wait).

    Strict on purpose: mitmproxy's HTTP/1 parser skips a leading empty line and
    its own guess lets much through; here the first byte must start a method
    token, and the first line must be a whole request line.
    """
    if h2:
        seen = min(len(data), len(H2_PREFACE))
        if data[:seen] != H2_PREFACE[:seen]:
            return False
        return True if seen == len(H2_PREFACE) else None
    end = data.find(b"\n")
    if end == -1:
        if len(data) <= MAX_REQUEST_LINE and _REQUEST_LINE_START.fullmatch(data):
            return None
        return False
    return _REQUEST_LINE.fullmatch(data[: end + 1]) is not None


class Closed(layer.Layer):
    """Where mitmproxy would have relayed bytes: closes the connection, relays nothing."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._closed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not self._closed:  # on the first event, whatever it is; the rest is dropped
            self._closed = True
            if self.context.server.connected:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


class HttpOnly:
    """Lets a client connection become TLS (once) and HTTP, nothing else.

    mitmproxy relays a connection whose first bytes do not look like HTTP as raw
    TCP to the address dialled, with no request hook called: nothing judges it.
    This hook runs after mitmproxy's own NextLayer addon and replaces any layer
    but TLS-then-HTTP with `Closed`, logging a `not_http` line. A CRLF in front
    of a request line is refused the same way.
    """

    def __init__(self, gate: PolicyGate, traffic: TrafficLogger | None = None) -> None:
        self.gate = gate
        self.traffic = traffic

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        chosen = nextlayer.layer
        if chosen is None:
            return  # mitmproxy waits for more bytes before choosing
        context = nextlayer.context
        verdict = self._judge_layer(nextlayer, chosen)
        if verdict is True:
            return
        _take_back(context, chosen)
        if verdict is None:
            nextlayer.layer = None  # ask again when more bytes arrive
            return
        nextlayer.layer = Closed(context)
        self._refused(context, type(chosen).__name__)

    @staticmethod
    def _judge_layer(nextlayer: layer.NextLayer, chosen: layer.Layer) -> bool | None:
        context = nextlayer.context
        if context.client.transport_protocol != "tcp":
            return False
        below = _layers_below(context, chosen)
        if any(isinstance(x, HttpLayer) for x in below):
            return False  # a tunnel inside HTTP (CONNECT, a 101): never
        if isinstance(chosen, ServerTLSLayer | ClientTLSLayer):
            # TLS once, at the start of the connection: never TLS inside TLS.
            if any(isinstance(x, ClientTLSLayer) for x in below):
                return False
            return not isinstance(chosen, ServerTLSLayer) or isinstance(
                chosen.child_layer, ClientTLSLayer
            )
        h2 = context.client.alpn == b"h2"
        looks = starts_like_http(nextlayer.data_client(), h2)
        if isinstance(chosen, HttpLayer):
            return looks
        # TCPLayer, UDPLayer, DNSLayer, QUIC layers, anything else: never. But the
        # start of a request line (mitmproxy's guess wants three bytes) is waited on.
        return None if looks is None else False

    def tls_clienthello(self, data: Any) -> None:
        # mitmproxy's other way to pass a connection through untouched: never.
        if getattr(data, "ignore_connection", False):
            logger.warning("an addon asked to pass a TLS connection through unjudged; refused")
            data.ignore_connection = False

    def _refused(self, context: Any, chosen: str) -> None:
        client = context.client
        dialled = context.server.address or client.sockname or ("", 0)
        host, port = str(dialled[0]), int(dialled[1])
        name = client.sni or host
        with contextlib.suppress(HostError):
            name = normalize_host(name)
        scheme = "https" if client.tls else "http"
        logger.warning(
            "closed a connection that is not HTTP: {}://{}:{} (dialled {}, mitmproxy chose {})",
            scheme,
            name,
            port,
            host,
            chosen,
        )
        if self.traffic is not None:
            self.traffic.write_not_http(
                policy=self.gate.policy,
                started=client.timestamp_start or time.time(),
                scheme=scheme,
                host=name,
                port=port,
            )


def _layers_below(context: Any, chosen: layer.Layer) -> list[layer.Layer]:
    for index, entry in enumerate(context.layers):
        if entry is chosen:
            return list(context.layers[:index])
    return list(context.layers)


def _take_back(context: Any, chosen: layer.Layer) -> None:
    """Building a layer pushes it (and its children) onto the context's stack: undo that."""
    for index, entry in enumerate(context.layers):
        if entry is chosen:
            del context.layers[index:]
            return


def _upgrade_tokens(headers: http.Headers) -> list[str]:
    return [
        token.strip().lower()
        for value in headers.get_all("upgrade")
        for token in value.split(",")
        if token.strip()
    ]


def _starts_websocket(flow: http.HTTPFlow) -> bool:
    """mitmproxy's own test for a 101 it hands to its WebSocket layer (any other 101
    would become a raw relay, or be closed with rawtcp off)."""
    assert flow.response is not None
    return (
        flow.response.status_code == 101
        and flow.response.headers.get("upgrade", "").lower() == "websocket"
        and _upgrade_tokens(flow.request.headers) == ["websocket"]
        and flow.request.headers.get("sec-websocket-version", "") == "13"
        and bool(ctx.options.websocket)
    )


class UpgradeGuard:
    """Only WebSocket may switch protocols: anything after another 101 cannot be judged.

    Runs before PolicyGate: h2c upgrade headers are dropped (the request goes on
    as plain HTTP/1.1, as mitmproxy itself does, but before a streamed body
    sends them); a request asking for any other protocol keeps its policy
    verdict if that blocks it, else becomes a `not_http` block (403). A 101
    that does not start a WebSocket is killed before the client sees it.
    """

    def __init__(self, gate: PolicyGate) -> None:
        self.gate = gate

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error is not None or flow.response is not None:
            return
        tokens = _upgrade_tokens(flow.request.headers)
        if not tokens or tokens == ["websocket"]:
            return
        if tokens == ["h2c"]:
            _drop_h2c(flow.request.headers)
            return
        verdict = self.gate.judge(flow)
        if not verdict.decision.blocked:
            verdict.decision = not_http_decision(
                verdict.policy, verdict.decision.host, verdict.decision.path
            )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or flow.response.status_code != 101 or _starts_websocket(flow):
            return
        verdict = self.gate.judge(flow)
        verdict.decision = not_http_decision(
            verdict.policy, verdict.decision.host, verdict.decision.path
        )
        logger.warning(
            "closed {}://{}{}: upstream switched protocols to {!r}, which cannot be judged",
            _scheme(flow),
            verdict.decision.host,
            verdict.decision.path,
            flow.response.headers.get("upgrade", ""),
        )
        flow.kill()


def _drop_h2c(headers: http.Headers) -> None:
    del headers["upgrade"]
    headers.pop("http2-settings", None)
    tokens = [
        token.strip()
        for value in headers.get_all("connection")
        for token in value.split(",")
        if token.strip().lower() not in ("", "upgrade", "http2-settings")
    ]
    if tokens:
        headers["connection"] = ", ".join(tokens)
    else:
        headers.pop("connection", None)


class PolicyGate:
    """Judges every request with the policy core; answers blocked ones with a 403.

    `policy` is swapped by PolicyReloader with one attribute assignment; each
    request reads it exactly once, so it is judged by one policy, old or new.
    """

    def __init__(self, policy: Policy | None = None, sink: BlockSink | None = None) -> None:
        self.policy: Policy = policy or NO_POLICY
        self.sink = sink

    def judge(self, flow: http.HTTPFlow) -> Verdict:
        """Decide (once per flow) and remember the verdict on the flow."""
        found = verdict_of(flow)
        if found is not None:
            return found
        policy = self.policy
        request, port = to_core_request(flow)
        decision = policy.decide(request)
        verdict = Verdict(
            decision=decision,
            policy=policy,
            port=port,
            upstream_host=_upstream_host(decision, request.dialled),
            started=flow.request.timestamp_start or time.time(),
        )
        flow.metadata[METADATA_KEY] = verdict
        return verdict

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        invalid = flow.error is not None  # mitmproxy refused it already (and answers 400)
        verdict = self.judge(flow)
        verdict.invalid = invalid
        if invalid or flow.response is not None:
            return
        if verdict.decision.blocked:
            response = block_response(
                verdict.decision,
                flow.request.method,
                _scheme(flow),
                verdict.port,
                verdict.policy.source,
            )
            if _body_may_stream(flow):
                # mitmproxy 11 reads the whole body before sending a response set here,
                # and switching to streaming past stream_large_bodies with a response
                # set crashes the connection. The local sink takes the body instead and
                # answers with the same 403; without it, close: nothing goes upstream.
                if self.sink is not None and self.sink.divert(flow, response):
                    return
                flow.kill()
                return
            # Streaming would open the upstream connection; a set response must not stream.
            flow.request.stream = False
            flow.response = response


def _body_may_stream(flow: http.HTTPFlow) -> bool:
    """Whether mitmproxy may switch this request body to streaming (over 1 MiB, or unknown)."""
    if flow.request.stream:
        return True
    headers = flow.request.headers
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return True
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return True
    return length > STREAM_LARGE_BODY_BYTES


class BlockSink:
    """A loopback HTTP/1.1 endpoint that answers blocked requests whose body streams.

    mitmproxy 11 cannot answer a request from `requestheaders` once its body is
    streamed (over 1 MiB, or chunked and growing past it), and streaming means
    connecting upstream. Such a blocked request is sent here instead of to its
    host: the sink reads and discards the body, then answers with the 403 the
    gate built, so the client gets the explanation and nothing reaches the
    real upstream. Requests carry a one-time token naming their answer.
    """

    TOKEN_HEADER = "X-Secure-Proxy-Block-Token"

    def __init__(self) -> None:
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._answers: dict[str, bytes] = {}

    async def running(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_SINK_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    def divert(self, flow: http.HTTPFlow, response: http.Response) -> bool:
        if self.port is None:
            return False
        token = secrets.token_urlsafe(18)
        self._answers[token] = _http11_bytes(response)
        flow.metadata[self.TOKEN_HEADER] = token
        flow.request.scheme = "http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = self.port
        flow.request.headers[self.TOKEN_HEADER] = token
        return True

    def _forget(self, flow: http.HTTPFlow) -> None:
        token = flow.metadata.pop(self.TOKEN_HEADER, None)
        if token is not None:
            self._answers.pop(token, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = _parse_head(head)
            await _discard_body(reader, headers)
            token = headers.get(self.TOKEN_HEADER.lower(), "")
            answer = self._answers.pop(token, None) or _http11_bytes(
                http.Response.make(403, b"blocked\n", {"Content-Type": "text/plain"})
            )
            writer.write(answer)
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass
        finally:
            writer.close()

    async def done(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


MAX_SINK_HEAD = 256 * 1024
_REASONS = {403: "Forbidden"}


def _http11_bytes(response: http.Response) -> bytes:
    body = response.raw_content or b""
    lines = [f"HTTP/1.1 {response.status_code} {_REASONS.get(response.status_code, 'Error')}"]
    for name, value in response.headers.items(multi=True):
        if name.lower() not in ("content-length", "connection", "transfer-encoding"):
            lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_head(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


async def _discard_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    """Read (and drop) a request body framed by Content-Length or chunked encoding."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return
            await _discard(reader, size + 2)
    else:
        await _discard(reader, int(headers.get("content-length", "0")))


async def _discard(reader: asyncio.StreamReader, count: int) -> None:
    while count > 0:
        chunk = await reader.read(min(count, 1 << 16))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", count)
        count -= len(chunk)


class UpstreamPinning:
    """Connects allowed requests to the judged name, never to the IP the client dialled.

    mitmproxy resolves the name itself; the upstream SNI becomes that name and
    the certificate is verified for it. An IP literal is connected to only when
    it is the judged host (no SNI and no Host header), which a rule must allow.
    """

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        verdict = verdict_of(flow)
        if verdict is None or flow.response is not None or flow.error is not None:
            return
        if verdict.decision.blocked:
            return  # answered by the gate, or diverted to the block sink
        # .data: the Host header / :authority the client sent stays as it was.
        flow.request.data.host = verdict.upstream_host
        flow.request.data.port = verdict.port


class TrafficLogger:
    """One JSON line per request, exactly once: at the response, or at the error."""

    def __init__(self, gate: PolicyGate, writer: TrafficLogWriter | None = None) -> None:
        self.gate = gate
        self.writer = writer

    def load(self, loader: Any) -> None:
        loader.add_option(
            "secure_proxy_traffic_log",
            str,
            str(paths.traffic_log()),
            "Traffic log file (JSON Lines), written when the policy's log_to_file is true.",
        )

    def configure(self, updated: set[str]) -> None:
        if "secure_proxy_traffic_log" in updated:
            path = Path(ctx.options.secure_proxy_traffic_log)
            if self.writer is None or self.writer.path != path:
                if self.writer is not None:
                    self.writer.close()
                self.writer = TrafficLogWriter(path)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Count body bytes as they pass. Streaming every allowed body also keeps
        # no body in memory; bodies are never inspected here.
        verdict = verdict_of(flow)
        if verdict is None or flow.response is not None or flow.error is not None:
            return
        if not callable(flow.request.stream):
            flow.request.stream = verdict.sent_out

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        verdict = verdict_of(flow)
        if verdict is None or flow.response is None or verdict.decision.blocked:
            return
        if not callable(flow.response.stream):
            flow.response.stream = verdict.sent_in

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self._write(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow, self._status_after_error(flow))

    @staticmethod
    def _status_after_error(flow: http.HTTPFlow) -> int | None:
        """The status the client got when a flow ends in an error, None if it got none."""
        verdict = verdict_of(flow)
        if verdict is not None and verdict.invalid:
            return 400  # mitmproxy answered the malformed request itself
        if flow.response is not None:
            # A streamed upstream response had its headers sent to the client already;
            # our own 403 goes out only after the response hook, which did not run.
            return flow.response.status_code if callable(flow.response.stream) else None
        message = (flow.error.msg if flow.error else "").lower()
        if flow.error and flow.error.msg == flow.error.KILLED_MESSAGE:
            return None
        if "client" in message:  # the client went away: it got nothing
            return None
        return 502  # mitmproxy answers upstream failures with 502 Bad Gateway

    def _write(self, flow: http.HTTPFlow, status: int | None) -> None:
        if flow.request is None:
            return
        verdict = self.gate.judge(flow)
        if verdict.logged:
            return
        verdict.logged = True
        if not verdict.policy.log_to_file or self.writer is None:
            return
        decision = verdict.decision
        rule = decision.rule
        request = flow.request
        response = flow.response
        bytes_in = verdict.sent_in.total
        if response is not None and response.raw_content:
            bytes_in += len(response.raw_content)
        bytes_out = verdict.sent_out.total + len(request.raw_content or b"")
        record = make_record(
            ts=verdict.started,
            action=decision.log_action,
            violation=decision.violation,
            mode=decision.mode.value,
            reason=decision.reason.value,
            rule=rule.host if rule else None,
            rule_source=rule.origin.label if rule else None,
            method=request.method,
            scheme=_scheme(flow),
            host=decision.host,
            port=verdict.port,
            path=decision.path,
            status=status,
            http_version=request.http_version,
            duration_ms=(time.time() - verdict.started) * 1000.0,
            bytes_out=bytes_out,
            bytes_in=bytes_in,
        )
        self.writer.write(record)

    def write_not_http(
        self, *, policy: Policy, started: float, scheme: str, host: str, port: int
    ) -> None:
        """The line for a connection closed before any HTTP request: nothing left the box."""
        if not policy.log_to_file or self.writer is None:
            return
        record = make_record(
            ts=started,
            action="BLOCK",
            violation=False,
            mode=policy.mode.value,
            reason=Reason.NOT_HTTP.value,
            rule=None,
            rule_source=None,
            method=None,
            scheme=scheme,
            host=host,
            port=port,
            path=None,
            status=None,
            http_version=None,
            duration_ms=(time.time() - started) * 1000.0,
            bytes_out=0,
            bytes_in=0,
        )
        self.writer.write(record)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()


class PolicyReloader:
    """SIGHUP: read policy.json again and swap it into the gate in one assignment.

    A missing or broken file keeps the policy in force and says why.
    """

    def __init__(self, gate: PolicyGate) -> None:
        self.gate = gate
        self._loop: asyncio.AbstractEventLoop | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "secure_proxy_policy",
            str,
            str(paths.policy_file()),
            "Compiled policy (policy.json) to load on SIGHUP.",
        )

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._loop = loop

    def reload(self) -> bool:
        path = Path(ctx.options.secure_proxy_policy)
        try:
            policy = read_policy(path)
        except FileNotFoundError:
            logger.error("policy reload: {} is missing; keeping the policy in force", path)
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error(
                "policy reload: {} is unusable ({}: {}); keeping the policy in force",
                path,
                type(exc).__name__,
                exc,
            )
            return False
        self.gate.policy = policy
        logger.info(
            "policy reloaded from {}: mode {}, {} rules, source {}",
            path,
            policy.mode.value,
            len(policy.rules),
            policy.source,
        )
        return True

    def done(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None


def _write_atomic(target: Path, data: bytes, mode: int) -> None:
    """Replace atomically; fall back to rewriting in place if the directory is not
    ours (a file pre-created for us by root)."""
    try:
        fsutil.atomic_write(target, data, mode)
    except PermissionError:
        with open(target, "wb") as handle:
            handle.write(data)
        with contextlib.suppress(PermissionError):
            os.chmod(target, mode)


class Readiness:
    """CA certificate published, then the readiness marker -- only once listening.

    mitmproxy calls `running` after its servers are bound, so the marker never
    appears before port 58080 accepts connections. A stale marker is removed at
    start and the marker is removed at shutdown.
    """

    def load(self, loader: Any) -> None:
        loader.add_option(
            "secure_proxy_ca_cert",
            str,
            str(paths.ca_cert()),
            "Where to publish the public CA certificate (0644).",
        )
        loader.add_option(
            "secure_proxy_ready_marker",
            str,
            str(paths.interceptor_marker()),
            "Readiness marker written once the interceptor is listening.",
        )

    def configure(self, updated: set[str]) -> None:
        if "secure_proxy_ready_marker" in updated:
            self._remove_marker()

    def _remove_marker(self) -> None:
        marker = Path(ctx.options.secure_proxy_ready_marker)
        try:
            marker.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove stale readiness marker {}: {}", marker, exc)

    def running(self) -> None:
        confdir = Path(os.path.expanduser(ctx.options.confdir))
        cert = (confdir / CA_CERT_NAME).read_bytes()
        target = Path(ctx.options.secure_proxy_ca_cert)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, cert, 0o644)
        proxyserver = ctx.master.addons.get("proxyserver")
        listening = [list(a[:2]) for a in proxyserver.listen_addrs()] if proxyserver else []
        marker = Path(ctx.options.secure_proxy_ready_marker)
        marker.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "listening": listening, "ca_cert": str(target)}
        _write_atomic(marker, (json.dumps(info) + "\n").encode(), 0o644)
        logger.info("interceptor ready: listening on {}, CA at {}", listening, target)

    def done(self) -> None:
        with contextlib.suppress(Exception):
            self._remove_marker()


def make_addons(policy: Policy | None, writer: TrafficLogWriter | None = None) -> list[Any]:
    sink = BlockSink()
    gate = PolicyGate(policy, sink)
    traffic = TrafficLogger(gate, writer)
    return [
        sink,  # listening before Readiness announces us
        HttpOnly(gate, traffic),
        UpgradeGuard(gate),  # before the gate: h2c headers go, other upgrades are refused
        gate,
        UpstreamPinning(),
        traffic,
        PolicyReloader(gate),
        Readiness(),
    ]


# ---------------------------------------------------------------------------
# Start-up


def prepare_confdir(confdir: Path, fresh_ca: bool = False) -> None:
    """Make the confdir private; with fresh_ca, drop the old CA so mitmproxy makes a new one.

    The init calls this (or passes --fresh-ca) at container start; a restart of
    the interceptor alone keeps the CA that running clients already trust.
    """
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):
        os.chmod(confdir, 0o700)
    if fresh_ca:
        for entry in confdir.glob("mitmproxy-*"):
            entry.unlink(missing_ok=True)


def build_upstream_bundle(
    confdir: Path, extra: str | None, system: Path = SYSTEM_CA_BUNDLE
) -> Path | None:
    """System trust store + the optional extra CA bundle, as one file for mitmproxy.

    mitmproxy verifies upstream against certifi unless told otherwise; corporate
    CAs live in the system store. None: no system store and no extra (certifi stays).
    """
    parts: list[bytes] = []
    if system.is_file():
        parts.append(system.read_bytes())
    if extra:
        extra_path = Path(extra)
        if not extra_path.is_file():
            raise FileNotFoundError(f"upstream CA bundle {extra_path} does not exist")
        parts.append(extra_path.read_bytes())
    if not parts:
        return None
    if not system.is_file():
        import certifi  # a mitmproxy dependency

        parts.insert(0, Path(certifi.where()).read_bytes())
    target = confdir / UPSTREAM_BUNDLE_NAME
    data = b"".join(p.rstrip(b"\n") + b"\n" for p in parts)
    _write_atomic(target, data, 0o644)
    return target


def _can_bind(family: socket.AddressFamily, host: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def transparent_modes(listen_host: str, port: int) -> list[str]:
    """Where to listen. By default loopback only, IPv4 and IPv6: the REDIRECT of
    locally generated traffic lands on 127.0.0.1 / ::1, and nothing outside the
    box must be able to use us as an open proxy. ::1 is skipped where IPv6 is
    disabled (Docker's default), since there is then no IPv6 traffic to catch."""
    if listen_host not in ("", "loopback"):
        return [f"transparent@{listen_host}:{port}"]
    modes = [f"transparent@127.0.0.1:{port}"]
    if _can_bind(socket.AF_INET6, "::1"):
        modes.append(f"transparent@::1:{port}")
    return modes


def mitmproxy_options(
    *,
    confdir: Path,
    listen_host: str,
    listen_port: int,
    upstream_bundle: Path | None,
    policy_file: Path,
    traffic_log: Path,
    ca_cert: Path,
    ready_marker: Path,
    verbosity: str,
) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "mode": transparent_modes(listen_host, listen_port),
        "listen_host": "",  # each mode names its own address
        "listen_port": listen_port,
        "confdir": str(confdir),
        "connection_strategy": "lazy",
        "onboarding": False,
        "flow_detail": 0,
        "termlog_verbosity": verbosity,
        "stream_large_bodies": STREAM_LARGE_BODIES,
        # Clients reach us only through the box's REDIRECT rules (we listen on
        # loopback); their source may be a global IPv6 address, which
        # block_global would refuse.
        "block_global": False,
        "ssl_insecure": False,
        # Never relay what is not HTTP: with rawtcp on, mitmproxy passes unknown bytes
        # (and whatever follows a non-WebSocket 101) to the dialled address as raw TCP,
        # with no request hook called. No host is passed through or handled as TCP/UDP.
        # HttpOnly refuses such layers too.
        "rawtcp": False,
        "tcp_hosts": [],
        "udp_hosts": [],
        "ignore_hosts": [],
        "allow_hosts": [],
        "websocket": True,
        "secure_proxy_policy": str(policy_file),
        "secure_proxy_traffic_log": str(traffic_log),
        "secure_proxy_ca_cert": str(ca_cert),
        "secure_proxy_ready_marker": str(ready_marker),
    }
    if upstream_bundle is not None:
        opts["ssl_verify_upstream_trusted_ca"] = str(upstream_bundle)
    return opts


async def serve(options: dict[str, Any], policy: Policy, extra_addons: list[Any] = ()) -> int:
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    master = DumpMaster(Options(), with_termlog=True, with_dumper=True)
    master.addons.add(*make_addons(policy), *extra_addons)
    master.options.update(**options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        prog="secure-proxy-interceptor",
        description="mitmproxy in transparent mode, enforcing /run/secure-proxy/policy.json.",
    )
    ap.add_argument(
        "--listen-host",
        default=env("SECURE_PROXY_LISTEN_HOST", "loopback"),
        help="address to listen on (default: 127.0.0.1 and ::1)",
    )
    ap.add_argument("--port", type=int, default=paths.INTERCEPTOR_PORT)
    ap.add_argument("--confdir", type=Path, default=default_confdir())
    ap.add_argument("--policy", type=Path, default=paths.policy_file())
    ap.add_argument("--traffic-log", type=Path, default=paths.traffic_log())
    ap.add_argument("--ca-cert", type=Path, default=paths.ca_cert())
    ap.add_argument("--ready-marker", type=Path, default=paths.interceptor_marker())
    ap.add_argument(
        "--upstream-ca",
        default=env("SECURE_PROXY_UPSTREAM_CA") or None,
        help="extra CA bundle trusted for upstream servers, besides the system store",
    )
    ap.add_argument(
        "--fresh-ca",
        action="store_true",
        default=env("SECURE_PROXY_FRESH_CA", "") == "1",
        help="delete the CA in the confdir first, so a new one is generated",
    )
    ap.add_argument(
        "--verbosity",
        default=env("SECURE_PROXY_MITM_VERBOSITY", "warn"),
        choices=("error", "warn", "info", "alert", "debug"),
        help="mitmproxy's own log level",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("SECURE_PROXY_LOG_LEVEL", "INFO"))
    try:
        policy = read_policy(args.policy)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error(
            "cannot load the policy {} ({}); the init writes it before starting the "
            "interceptor. Not starting: traffic stays blocked (fail closed).",
            args.policy,
            exc,
        )
        return 2
    try:
        prepare_confdir(args.confdir, args.fresh_ca)
        bundle = build_upstream_bundle(args.confdir, args.upstream_ca)
    except OSError as exc:
        logger.error("cannot prepare {}: {}", args.confdir, exc)
        return 2
    with contextlib.suppress(OSError):
        # Stale from an earlier run: it must not claim readiness before we listen.
        args.ready_marker.unlink(missing_ok=True)
    options = mitmproxy_options(
        confdir=args.confdir,
        listen_host=args.listen_host,
        listen_port=args.port,
        upstream_bundle=bundle,
        policy_file=args.policy,
        traffic_log=args.traffic_log,
        ca_cert=args.ca_cert,
        ready_marker=args.ready_marker,
        verbosity=args.verbosity,
    )
    logger.info(
        "interceptor starting: mode {}, policy {}, confdir {}, port {}",
        policy.mode.value,
        args.policy,
        args.confdir,
        args.port,
    )
    return asyncio.run(serve(options, policy))


if __name__ == "__main__":
    sys.exit(main())
