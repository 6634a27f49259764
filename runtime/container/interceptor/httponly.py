"""Only HTTP (and WebSocket) leaves the box: everything else is closed, never relayed.

HttpOnly decides at `next_layer` which protocol layers a connection may get;
UpgradeGuard refuses requests and responses that would switch an HTTP
connection to a protocol nobody can judge.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import TYPE_CHECKING, Any

from loguru import logger
from mitmproxy import connection, ctx, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer
from mitmproxy.proxy.mode_specs import TransparentMode

from runtime.container.interceptor.gate import not_http_decision, scheme_of
from runtime.core.hosts import HostError, normalize_host
from runtime.core.wellformed import TOKEN

if TYPE_CHECKING:
    from runtime.container.interceptor.gate import PolicyGate
    from runtime.container.interceptor.logger import TrafficLogger
    from runtime.container.interceptor.policystore import PolicyStore

#: An HTTP/1 request line (RFC 9112 section 3): method token, target, version.
_REQUEST_LINE = re.compile(TOKEN + rb" [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]\r?\n")
#: What a request line can look like before its end has arrived.
_REQUEST_LINE_START = re.compile(TOKEN + rb"(?: [^\x00-\x20\x7f]*(?: [HTP/0-9.]*\r?)?)?")
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

    def __init__(self, store: PolicyStore, traffic: TrafficLogger | None = None) -> None:
        self.store = store
        self.traffic = traffic

    def client_connected(self, client: connection.Client) -> None:
        """Only connections the firewall REDIRECTed (dialled to port 80/443) are served.

        One dialled straight to our own port (127.0.0.1:58080+n) has that port as its
        original destination: judged, an allowed request would go to the named host
        on that port, and one naming this box (`0.0.0.0`, `::ffff:127.0.0.1`, which
        mitmproxy's own self-connect check misses) in monitor mode or under a rule
        allowing private addresses would be sent back to us, again and again: one
        request becomes thousands of connections and log lines (the worker's file
        descriptors, CPU and the disk). Setting `error` closes the connection unread."""
        mode = client.proxy_mode
        if not isinstance(mode, TransparentMode) or not client.sockname:
            return
        host, port = str(client.sockname[0]), int(client.sockname[1])
        if port == mode.listen_port(ctx.options.listen_port):
            logger.warning(
                "closed a connection dialled straight to the interceptor ({}:{}, from {}):"
                " only redirected web traffic is served",
                host,
                port,
                client.peername[0] if client.peername else "?",
            )
            client.error = "dialled the interceptor's own port"

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
                policy=self.store.policy,
                conn_id=client.id,
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
            scheme_of(flow),
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
