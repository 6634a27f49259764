"""The policy's verdict on each request.

PolicyGate judges at `requestheaders` and stores a Verdict on the flow; every
later addon reads that Verdict (`verdict_of`), none decides again (UpstreamPinning,
upstream.py, may turn an allow into a private_address block or violation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger
from mitmproxy import http
from mitmproxy.proxy.mode_specs import TransparentMode

from runtime.core.explain import explain
from runtime.core.hosts import HostError, normalize_host
from runtime.core.policy import Action, Decision, Policy, Reason, Request
from runtime.core.wellformed import malformed

if TYPE_CHECKING:
    from runtime.container.interceptor.blocksink import BlockSink
    from runtime.container.interceptor.policystore import PolicyStore

METADATA_KEY = "secure_proxy"
DECISION_HEADER = "X-Secure-Proxy-Decision"
STREAM_LARGE_BODIES = "1m"
STREAM_LARGE_BODY_BYTES = 1024 * 1024
#: Seconds a client refused for log_unavailable is told to wait.
LOG_RETRY_AFTER = 5


class Counter:
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
    address: str | None = None  # the upstream address the request was pinned to
    invalid: bool = False  # mitmproxy rejected the request itself (the client got a 400)
    logged: bool = False
    sent_out: Counter = field(default_factory=Counter)
    sent_in: Counter = field(default_factory=Counter)


def verdict_of(flow: http.HTTPFlow) -> Verdict | None:
    return flow.metadata.get(METADATA_KEY)


def original_destination(flow: http.HTTPFlow) -> tuple[str, int]:
    """The address the client dialled. In transparent mode mitmproxy stores it as sockname."""
    if isinstance(flow.client_conn.proxy_mode, TransparentMode) and flow.client_conn.sockname:
        host, port = flow.client_conn.sockname[:2]
        return str(host), int(port)
    return flow.request.host, flow.request.port


def scheme_of(flow: http.HTTPFlow) -> str:
    """http or https. A request mitmproxy could not parse as one of ours (a CONNECT
    sent to the transparent port) has none: then the client connection says."""
    return flow.request.scheme or ("https" if flow.client_conn.tls_established else "http")


def to_core_request(flow: http.HTTPFlow) -> tuple[Request, int]:
    """The policy core's view of a flow (and the port dialled)."""
    dialled, port = original_destination(flow)
    request = Request(
        method=flow.request.method,
        path=flow.request.path,
        scheme=scheme_of(flow),
        port=port,
        sni=flow.client_conn.sni or None,
        # HTTP/2: the :authority pseudo-header, else Host (mitmproxy maps both).
        host_header=flow.request.host_header or None,
        dialled=dialled,
        # HTTP/1 absolute-form target (or HTTP/2 :authority again): must agree too.
        authority=flow.request.authority or None,
    )
    return request, port


def upstream_host(decision: Decision, dialled: str | None) -> str:
    """The name to connect to: the judged host, resolved by the proxy."""
    try:
        return normalize_host(decision.host)
    except HostError:
        # Only reachable when the request names no usable host and the policy let it
        # through anyway (allow-all or monitor): then the dialled address is all we have.
        return dialled or decision.host


def not_http_decision(policy: Policy, host: str, path: str | None) -> Decision:
    """A block in every mode, monitor and allow-all included: what follows cannot be judged."""
    return Decision(Action.BLOCK, Reason.NOT_HTTP, policy.mode, host, path or "/")


def log_unavailable_decision(policy: Policy, decision: Decision) -> Decision:
    """A block in every mode: the policy logs every request and the log cannot be written."""
    return Decision(Action.BLOCK, Reason.LOG_UNAVAILABLE, policy.mode, decision.host, decision.path)


def block_response(
    decision: Decision, method: str, scheme: str, port: int, source: str
) -> http.Response:
    """403 with the explanation an agent can act on (the same text as `--network-check`);
    503 when the request was refused because the traffic log cannot be written."""
    host = f"[{decision.host}]" if ":" in decision.host else decision.host
    default = {"http": 80, "https": 443}.get(scheme)
    authority = host if port == default else f"{host}:{port}"
    url = f"{scheme}://{authority}{decision.path}"
    body = explain(decision, method, url, source).encode("utf-8")
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        DECISION_HEADER: f"block; reason={decision.reason.value}",
        "Cache-Control": "no-store",
    }
    if decision.reason is Reason.LOG_UNAVAILABLE:
        # Not the request's fault, and over once the log can be written again.
        headers["Retry-After"] = str(LOG_RETRY_AFTER)
        return http.Response.make(503, body, headers)
    return http.Response.make(403, body, headers)


def body_may_stream(flow: http.HTTPFlow) -> bool:
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


def answer(flow: http.HTTPFlow, response: http.Response, sink: BlockSink | None) -> None:
    """Answer a request locally at `requestheaders`: nothing of it goes upstream."""
    if body_may_stream(flow):
        # mitmproxy 11 reads the whole body before sending a response set here,
        # and switching to streaming past stream_large_bodies with a response
        # set crashes the connection. The local sink takes the body instead and
        # answers with the same response; without it, close: nothing goes upstream.
        if sink is not None and sink.divert(flow, response):
            return
        flow.kill()
        return
    # Streaming would open the upstream connection; a set response must not stream.
    flow.request.stream = False
    flow.response = response


def refuse(flow: http.HTTPFlow, verdict: Verdict, sink: BlockSink | None) -> None:
    """Answer a request with the explanation of its verdict's refusal (403, or 503 for
    log_unavailable), locally: nothing of it goes upstream."""
    response = block_response(
        verdict.decision, flow.request.method, scheme_of(flow), verdict.port, verdict.policy.source
    )
    answer(flow, response, sink)


class PolicyGate:
    """Judges every request with the policy core; answers blocked ones with a 403.

    The policy comes from the PolicyStore, read exactly once per request, so a
    request is judged by one policy, old or new, even across a reload.
    """

    def __init__(self, store: PolicyStore, sink: BlockSink | None = None) -> None:
        self.store = store
        self.sink = sink

    def judge(self, flow: http.HTTPFlow) -> Verdict:
        """Decide (once per flow) and remember the verdict on the flow."""
        found = verdict_of(flow)
        if found is not None:
            return found
        policy = self.store.policy
        request, port = to_core_request(flow)
        decision = policy.decide(request)
        data = flow.request.data
        problem = malformed(data.method, data.path, data.headers.fields)
        if problem is not None:
            # Written out as HTTP/1.1 it would not be the request judged (HTTP/2 carries
            # line breaks in fields): refused in every mode, nothing of it goes upstream.
            logger.warning(
                "refused {}://{} as not_http: {}", scheme_of(flow), decision.host, problem
            )
            decision = not_http_decision(policy, decision.host, decision.path)
        verdict = Verdict(
            decision=decision,
            policy=policy,
            port=port,
            upstream_host=upstream_host(decision, request.dialled),
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
            refuse(flow, verdict, self.sink)
