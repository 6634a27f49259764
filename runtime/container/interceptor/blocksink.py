"""The block sink: a loopback endpoint that answers blocked requests whose body streams."""

from __future__ import annotations

import asyncio
import secrets

from mitmproxy import http


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
