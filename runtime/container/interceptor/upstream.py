"""Where allowed requests go: the judged name, resolved once by the proxy, to a checked address.

UpstreamPinning resolves the judged host at `requestheaders` (getaddrinfo on the
event loop's executor: the loop never blocks), checks every address with the
core (runtime/core/addresses.py) and points the request at the chosen address
itself. mitmproxy then connects to that IP and never resolves the name again,
so a second DNS answer cannot swap the address between the check and the
connection. The TLS server name stays the judged name (`server_connect`), so the
upstream certificate is verified for the name, as before.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from runtime.container.interceptor.gate import (
    Verdict,
    answer,
    refuse,
    scheme_of,
    verdict_of,
)
from runtime.core.addresses import choose_address

if TYPE_CHECKING:
    from runtime.container.interceptor.blocksink import BlockSink

#: (host, port) -> the host's addresses, in the resolver's order. Raises OSError.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
#: Seconds a client connection keeps using one answer for a name: its requests share
#: upstream connections, and a long-lived one still follows a host that moves.
ANSWER_SECONDS = 60.0


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses getaddrinfo gives (hosts file, then DNS), without blocking the loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(slots=True)
class _Client:
    """What one client connection's requests share."""

    #: (name, port) -> (its addresses, until when): one lookup per name and client
    #: connection (for ANSWER_SECONDS), as mitmproxy reuses upstream connections for them.
    resolved: dict[tuple[str, int], tuple[tuple[str, ...], float]] = field(default_factory=dict)
    #: (address, port) -> the name a TLS connection to it is opened and verified for.
    names: dict[tuple[str, int], str] = field(default_factory=dict)


class UpstreamPinning:
    """Connects allowed requests to a checked address of the judged name, never to the
    IP the client dialled and never to an address the rule does not allow.

    An IP literal is connected to only when it is the judged host (no SNI and no
    Host header), which a rule must allow. A name whose addresses are all off the
    internet gets a 403 `private_address` in enforce mode, unless its rule allows
    them; monitor mode connects and logs a violation; allow-all checks nothing.
    """

    def __init__(self, sink: BlockSink | None = None, resolve: Resolver = system_resolve) -> None:
        self.sink = sink
        self.resolve = resolve
        self.clients: dict[str, _Client] = {}

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        verdict = verdict_of(flow)
        if verdict is None:
            # The gate failed (mitmproxy logs an addon's exception and goes on):
            # a request nobody judged is closed, never sent to the address dialled.
            logger.error("no verdict for {} {}: closed unjudged", flow.request.method, flow.id)
            flow.kill()
            return
        if verdict.decision.blocked:
            return  # answered by the gate, or diverted to the block sink
        try:
            await self._pin(flow, verdict)
        except Exception:
            # An error here must not leave the request aimed at the IP the client dialled.
            logger.exception("pinning {} {} failed: closed", flow.request.method, flow.id)
            flow.kill()

    async def _pin(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        name, port = verdict.upstream_host, verdict.port
        client = self.clients.setdefault(flow.client_conn.id, _Client())
        addresses, until = client.resolved.get((name, port), ((), 0.0))
        if time.monotonic() >= until:
            try:
                addresses = tuple(await self.resolve(name, port))
            except OSError as exc:  # socket.gaierror included
                self._bad_gateway(flow, f"cannot resolve {name}: {exc}")
                return
            client.resolved[(name, port)] = (addresses, time.monotonic() + ANSWER_SECONDS)
        address, verdict.decision = choose_address(verdict.decision, addresses)
        if verdict.decision.blocked:
            refuse(flow, verdict, self.sink)
            return
        if address is None:
            self._bad_gateway(flow, f"{name} has no address")
            return
        if scheme_of(flow) == "https":
            # mitmproxy reuses an upstream connection for the same address on this client
            # connection; one opened for another name (a client that sent no SNI and
            # several Host headers) would carry this request unverified for its name.
            verified_for = client.names.setdefault((address, port), name)
            if verified_for != name:
                self._bad_gateway(
                    flow,
                    f"this connection reaches {address} as {verified_for}; send the request "
                    f"for {name} on a connection of its own (with SNI)",
                )
                return
        verdict.address = address
        # .data: the Host header / :authority the client sent stays as it was.
        flow.request.data.host = address
        flow.request.data.port = port

    def _bad_gateway(self, flow: http.HTTPFlow, why: str) -> None:
        """The request is allowed but cannot be sent: 502, as mitmproxy answers a failed
        upstream connection (and logged as such)."""
        logger.info("{} {}: {}", flow.request.method, flow.id, why)
        response = http.Response.make(
            502, f"502 Bad Gateway: {why}\n", {"Content-Type": "text/plain; charset=utf-8"}
        )
        answer(flow, response, self.sink)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A TLS connection to a pinned address names and verifies the judged name, not the IP."""
        client = self.clients.get(data.client.id)
        if client is None or data.server.address is None or data.server.sni is None:
            return
        address, port = data.server.address[:2]
        name = client.names.get((str(address), int(port)))
        if name is not None:
            data.server.sni = name

    def client_disconnected(self, client: connection.Client) -> None:
        self.clients.pop(client.id, None)
