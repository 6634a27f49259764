"""The traffic log: one JSON line per request, and per connection closed as not HTTP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loguru import logger
from mitmproxy import ctx, http

from runtime import paths
from runtime.container.interceptor.gate import scheme_of, verdict_of
from runtime.core.policy import Policy, Reason
from runtime.core.record import HttpRecord, format_ts
from runtime.trafficlog import TrafficLogWriter


class TrafficLogger:
    """One JSON line per request, exactly once: at the response, or at the error."""

    def __init__(self) -> None:
        self.writer: TrafficLogWriter | None = None  # opened by `configure`

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
        verdict = verdict_of(flow)
        if verdict is None:
            # The gate runs first at requestheaders, before any response or error.
            logger.warning("no verdict for {} {}: not logged", flow.request.method, flow.id)
            return
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
        record = HttpRecord(
            ts=format_ts(verdict.started),
            action=decision.log_action,
            violation=decision.violation,
            mode=decision.mode.value,
            reason=decision.reason.value,
            rule=rule.host if rule else None,
            rule_source=rule.origin.label if rule else None,
            method=request.method,
            scheme=scheme_of(flow),
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
        record = HttpRecord(
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
