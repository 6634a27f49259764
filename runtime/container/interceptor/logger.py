"""The traffic log: a start and an end line per request, one line per connection closed
as not HTTP. The log never fails open: a request that must be logged and whose
start line cannot be written is refused (503, `log_unavailable`), never forwarded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from mitmproxy import ctx, http

from runtime import paths
from runtime.container.interceptor.gate import (
    Verdict,
    log_unavailable_decision,
    refuse,
    scheme_of,
    verdict_of,
)
from runtime.core.policy import Policy, Reason
from runtime.core.record import END, START, HttpRecord, format_ts
from runtime.core.wellformed import is_token
from runtime.trafficlog import TrafficLogWriter

if TYPE_CHECKING:
    from runtime.container.interceptor.blocksink import BlockSink


class TrafficLogger:
    """Logs each request twice, under one id (`flow.id`):

    - start, at `requestheaders`, after the gate's verdict and before anything of
      the request can go upstream: a request that reached the upstream is in the
      log even if the interceptor is killed while it is in flight. When the
      policy logs (monitor, or log_to_file) and this line cannot be written, the
      request is answered 503 `log_unavailable` instead of being forwarded.
    - end, exactly once: at the response, or at the error (status, duration, bytes).
    """

    def __init__(self, sink: BlockSink | None = None) -> None:
        self.writer: TrafficLogWriter | None = None  # opened by `configure`
        self.sink = sink  # answers refused requests whose body streams

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
        verdict = verdict_of(flow)
        if verdict is None:
            return  # the gate runs first; without its verdict nothing is logged
        if not self._log(flow, verdict, START, None):
            self._refuse(flow, verdict)
        if flow.response is not None or flow.error is not None:
            return
        # Count body bytes as they pass. Streaming every allowed body also keeps
        # no body in memory; bodies are never inspected here.
        if not callable(flow.request.stream):
            flow.request.stream = verdict.sent_out

    def _refuse(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        """The start line is not in the log: nothing of this request may go out."""
        answered = flow.error is not None or flow.response is not None
        if verdict.decision.blocked or verdict.invalid or answered:
            return  # refused already
        verdict.decision = log_unavailable_decision(verdict.policy, verdict.decision)
        refuse(flow, verdict, self.sink)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        verdict = verdict_of(flow)
        if verdict is None or flow.response is None or verdict.decision.blocked:
            return
        if not callable(flow.response.stream):
            flow.response.stream = verdict.sent_in

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self._end(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow, self._status_after_error(flow))

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

    def _end(self, flow: http.HTTPFlow, status: int | None) -> None:
        if flow.request is None:
            return
        verdict = verdict_of(flow)
        if verdict is None:
            # The gate runs first at requestheaders, before any response or error.
            logger.warning("no verdict for {} {}: not logged", flow.request.method, flow.id)
            return
        if verdict.logged:
            return
        verdict.logged = True
        self._log(flow, verdict, END, status)

    def _log(self, flow: http.HTTPFlow, verdict: Verdict, phase: str, status: int | None) -> bool:
        """Write one of the request's lines; False only when the policy logs and it failed."""
        if not verdict.policy.log_to_file:
            return True
        if self.writer is None:
            return False  # no log configured while the policy wants one: fail closed
        decision = verdict.decision
        rule = decision.rule
        request = flow.request
        duration: float | None = None
        bytes_out: int | None = None
        bytes_in: int | None = None
        if phase == END:
            duration = (time.time() - verdict.started) * 1000.0
            bytes_out = verdict.sent_out.total + len(request.raw_content or b"")
            bytes_in = verdict.sent_in.total
            if flow.response is not None and flow.response.raw_content:
                bytes_in += len(flow.response.raw_content)
        record = HttpRecord(
            phase=phase,
            id=flow.id,
            ts=format_ts(verdict.started),
            action=decision.log_action,
            violation=decision.violation,
            mode=decision.mode.value,
            reason=decision.reason.value,
            rule=rule.host if rule else None,
            rule_source=rule.origin.label if rule else None,
            # A method that is not a token was refused (not_http); the log says none.
            method=request.method if is_token(request.data.method) else None,
            scheme=scheme_of(flow),
            host=decision.host,
            port=verdict.port,
            path=decision.path,
            status=status,
            http_version=request.http_version,
            duration_ms=duration,
            bytes_out=bytes_out,
            bytes_in=bytes_in,
        )
        return self.writer.write(record)

    def write_not_http(
        self, *, policy: Policy, conn_id: str, started: float, scheme: str, host: str, port: int
    ) -> None:
        """The line for a connection closed before any HTTP request: nothing left the box."""
        if not policy.log_to_file or self.writer is None:
            return
        record = HttpRecord(
            phase=END,
            id=conn_id,
            ts=format_ts(started),
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
