"""The interceptor: mitmproxy in transparent mode with the policy addons.

Small addons, one concern each, in the order mitmproxy calls them:

- PolicyStore (policystore.py): loads policy.json when the `secure_proxy_policy`
  option is set and refuses to start without it (OptionsError); SIGHUP reads it
  again and swaps the policy in one step.
- BlockSink (blocksink.py): a loopback endpoint that answers blocked requests
  whose body streams, so their body never goes upstream.
- HttpOnly (httponly.py): at `next_layer`, lets a connection become only TLS
  (once) and then HTTP; anything else mitmproxy would relay as raw TCP/UDP
  (bytes that are not HTTP, a CRLF before the request line, DNS, QUIC) is
  closed and logged as `not_http`. `rawtcp` is off as well; this is the second lock.
  At `client_connected` it closes a connection dialled straight to our own port
  (not REDIRECTed), which could otherwise make a worker forward to itself.
- UpgradeGuard (httponly.py): a request asking to switch to a protocol other
  than WebSocket is refused (`not_http`); h2c upgrade headers are dropped; a
  `101` that does not start a WebSocket mitmproxy can judge frame by frame is killed.
- PolicyGate (gate.py): judges every request (each request of a keep-alive
  connection, every HTTP/2 stream, WebSocket upgrades, plain HTTP) with the
  policy core at `requestheaders` -- before any byte of the request can reach
  upstream, even when the body is streamed -- stores the Verdict on the flow
  and answers blocked requests with a 403.
- CredentialGuard (credentials.py): after the verdict, before anything is
  forwarded: puts the real sign-in token in place of the agent's placeholder in
  `Authorization` on requests to GitHub's and Copilot's hosts (and keeps it out
  of their responses), and refuses a request carrying the placeholder anywhere
  else (403 `credential_leak`, every mode).
- UpstreamPinning (upstream.py): resolves the judged name once, checks every
  address (no loopback, private or link-local address unless the rule allows
  it: `private_address`) and connects to the checked address itself, with the
  name as TLS server name; never to the IP the client dialled.
- TrafficLogger (logger.py): two JSON lines per request, from the Verdict on
  the flow: "start" before anything is forwarded -- when the policy logs and it
  cannot be written, the request is refused (503, `log_unavailable`) -- and
  "end" when the response completes or the request fails.
- Readiness (readiness.py): publishes the CA certificate, then the readiness
  marker, once mitmproxy is listening.

framing.py makes mitmproxy frame an HTTP/2 request body that has no
content-length (chunked) when it writes the request to an HTTP/1.1 upstream, which
would otherwise read the body as further requests.

main.py turns the command line into options and runs them (`secure-proxy-interceptor`,
or `python -m runtime.container.interceptor`).
"""

from __future__ import annotations

from typing import Any

# First: mitmproxy.addons must not run its package body (all default addons).
from runtime.container.interceptor import lean  # noqa: F401  (installs itself)
from runtime.container.interceptor.blocksink import BlockSink
from runtime.container.interceptor.credentials import CredentialGuard
from runtime.container.interceptor.framing import install as frame_http2_bodies
from runtime.container.interceptor.gate import PolicyGate
from runtime.container.interceptor.httponly import HttpOnly, UpgradeGuard
from runtime.container.interceptor.logger import TrafficLogger
from runtime.container.interceptor.policystore import PolicyStore
from runtime.container.interceptor.readiness import Readiness
from runtime.container.interceptor.upstream import UpstreamPinning


def make_addons() -> list[Any]:
    """The addons, wired to each other, in the order mitmproxy must call them."""
    frame_http2_bodies()  # mitmproxy's HTTP/1 client, before any request goes out
    store = PolicyStore()
    sink = BlockSink()
    gate = PolicyGate(store, sink)
    traffic = TrafficLogger(sink)
    return [
        store,  # first: its `configure` loads the policy every other addon reads
        sink,  # listening before Readiness announces us
        HttpOnly(store, traffic),
        UpgradeGuard(gate),  # before the gate: h2c headers go, other upgrades are refused
        gate,
        CredentialGuard(sink),  # after the verdict, before forwarding and the log's start
        UpstreamPinning(sink),
        traffic,
        Readiness(),
    ]
