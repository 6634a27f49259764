"""The sign-in token's swap: the agent holds a placeholder, the interceptor alone the token.

CredentialGuard runs at `requestheaders` after the gate's verdict and before
anything is forwarded (UpstreamPinning, the traffic log's start line):

- an allowed HTTPS request to one of TOKEN_HOSTS gets the real token in place of
  the placeholder in its `Authorization` header (`token P`, `Bearer P`, Basic
  with P as user or password); its response is scrubbed of the token on the way
  back (headers, and an uncompressed body), so the agent cannot read it there;
- any other request that carries a placeholder (any header, the URL), to
  another host or in clear text to GitHub, is refused with 403
  `credential_leak`, in every mode: nothing of it goes out.

The pairs come from credentials.json (runtime.container.signin), which the init
writes only when rules are enabled and a token was passed; without it this addon
does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from loguru import logger
from mitmproxy import ctx, exceptions, http

from runtime import paths
from runtime.container.interceptor.gate import (
    Counter,
    Verdict,
    refuse,
    scheme_of,
    verdict_of,
)
from runtime.container.signin import CredentialsError, read
from runtime.core.credentials import carries_placeholder, is_token_host, swap_authorization
from runtime.core.policy import Action, Decision, Reason

if TYPE_CHECKING:
    from runtime.container.interceptor.blocksink import BlockSink

SWAPPED_KEY = "secure_proxy_swapped"


def credential_leak_decision(decision: Decision) -> Decision:
    """A block in every mode: the placeholder was headed for a host that never gets the token."""
    reason = Reason.CREDENTIAL_LEAK
    return Decision(Action.BLOCK, reason, decision.mode, decision.host, decision.path)


class Scrub:
    """A response body stream that turns the real token back into its placeholder.

    A token split across two chunks is caught: the end of a chunk that could be the
    start of a token is held back until the next chunk (or the end, b"") shows which.
    The placeholder has the token's length, so Content-Length stays right. Bytes
    pass on to `then` (the traffic log's counter)."""

    def __init__(self, back: dict[bytes, bytes], then: Counter) -> None:
        self.back = back
        self.then = then
        self.held = b""
        self.longest = max(len(t) for t in back)

    def __call__(self, chunk: bytes) -> bytes:
        data = self.held + chunk
        for token, placeholder in self.back.items():
            data = data.replace(token, placeholder)
        keep = 0 if not chunk else self._partial(data)
        self.held = data[len(data) - keep :] if keep else b""
        return self.then(data[: len(data) - keep])

    def _partial(self, data: bytes) -> int:
        """The length of the longest end of `data` that starts some token."""
        for n in range(min(self.longest - 1, len(data)), 0, -1):
            tail = data[-n:]
            if any(t.startswith(tail) for t in self.back):
                return n
        return 0


class CredentialGuard:
    def __init__(self, sink: BlockSink | None = None) -> None:
        self.sink = sink
        self.real_of: dict[str, str] = {}  # placeholder -> token

    def load(self, loader: Any) -> None:
        loader.add_option(
            "secure_proxy_credentials",
            Optional[str],  # noqa: UP045 (mitmproxy compares typespecs with this form)
            str(paths.credentials_file()),
            "The sign-in token and its placeholder (written by the init when rules are "
            "enabled); absent: no swap.",
        )

    def configure(self, updated: set[str]) -> None:
        if "secure_proxy_credentials" not in updated:
            return
        value = ctx.options.secure_proxy_credentials
        try:
            self.real_of = read(Path(value)) if value else {}
        except CredentialsError as exc:
            # Fail closed: without the pairs, the placeholder would reach GitHub unswapped
            # and, worse, no request carrying it elsewhere would be stopped.
            raise exceptions.OptionsError(f"{exc}; not starting") from None
        if self.real_of:
            logger.info("sign-in: {} token(s) swapped for their placeholders", len(self.real_of))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.real_of or flow.response is not None or flow.error is not None:
            return
        verdict = verdict_of(flow)
        if verdict is None or verdict.decision.blocked:
            return  # the gate answers (or UpstreamPinning closes): nothing goes out
        if is_token_host(verdict.upstream_host) and scheme_of(flow) == "https":
            self._swap(flow)
            return
        request = flow.request
        where = carries_placeholder(
            self.real_of,
            [(k, v) for k, v in request.headers.items(multi=True)],
            [request.path, request.host_header or "", request.authority or ""],
        )
        if where is not None:
            self._refuse(flow, verdict, where)

    def _swap(self, flow: http.HTTPFlow) -> None:
        headers = flow.request.headers
        values = headers.get_all("authorization")
        swapped = [swap_authorization(v, self.real_of) for v in values]
        if any(s is not None for s in swapped):
            headers.set_all(
                "authorization", [new or old for new, old in zip(swapped, values, strict=True)]
            )
            flow.metadata[SWAPPED_KEY] = True

    def _refuse(self, flow: http.HTTPFlow, verdict: Verdict, where: str) -> None:
        verdict.decision = credential_leak_decision(verdict.decision)
        logger.warning(
            "credential_leak: {} to {} carried the sign-in placeholder ({}); refused",
            flow.request.method,
            verdict.decision.host,
            where,
        )
        refuse(flow, verdict, self.sink)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The response of a swapped request: the token never comes back to the agent."""
        if not flow.metadata.get(SWAPPED_KEY) or flow.response is None:
            return
        back = {real: ph for ph, real in self.real_of.items()}
        headers = flow.response.headers
        for name in list(headers.keys()):
            values = headers.get_all(name)
            clean = [_replace_all(v, back) for v in values]
            if clean != values:
                headers.set_all(name, clean)
        verdict = verdict_of(flow)
        if verdict is not None and not callable(flow.response.stream):
            # Ahead of the traffic log, which then leaves the stream as it is: Scrub
            # passes the bytes on to its counter.
            encoded = {r.encode(): p.encode() for r, p in back.items()}
            flow.response.stream = Scrub(encoded, verdict.sent_in)


def _replace_all(text: str, back: dict[str, str]) -> str:
    for real, placeholder in back.items():
        text = text.replace(real, placeholder)
    return text
