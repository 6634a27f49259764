"""The block sink: a loopback endpoint that answers blocked requests whose body streams."""

from __future__ import annotations

import asyncio
import secrets

import h11
from mitmproxy import http
from mitmproxy.http import status_codes

#: The longest request head (request line and headers) the sink reads.
MAX_SINK_HEAD = 256 * 1024
READ_SIZE = 1 << 16
#: Whatever framing the body had, these are the sink's own on the way back.
_FRAMING = (b"content-length", b"connection", b"transfer-encoding")


class BlockSink:
    """A loopback HTTP/1.1 endpoint that answers blocked requests whose body streams.

    mitmproxy 11 cannot answer a request from `requestheaders` once its body is
    streamed (over 1 MiB, or chunked and growing past it), and streaming means
    connecting upstream. Such a blocked request is sent here instead of to its
    host: the sink reads and discards the body, then answers with the response
    the gate built, so the client gets the explanation and nothing reaches the
    real upstream. Requests carry a one-time token naming their answer. HTTP/1.1
    on the wire is h11's (framing, chunks, trailers), never parsed by hand.
    """

    TOKEN_HEADER = "X-Secure-Proxy-Block-Token"

    def __init__(self) -> None:
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._answers: dict[str, http.Response] = {}

    async def running(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def divert(self, flow: http.HTTPFlow, response: http.Response) -> bool:
        if self.port is None:
            return False
        token = secrets.token_urlsafe(18)
        self._answers[token] = response
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
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_SINK_HEAD)
        try:
            token = await _read_request(conn, reader, writer, self.TOKEN_HEADER)
            if token is None:
                return  # the peer went away before the request ended
            answer = self._answers.pop(token, None) or http.Response.make(
                403, b"blocked\n", {"Content-Type": "text/plain"}
            )
            writer.write(_serialize(conn, answer))
            await writer.drain()
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            writer.close()

    async def done(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


async def _read_request(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    token_header: str,
) -> str | None:
    """Read one request to its end, dropping the body; its token ("" if none), None at EOF."""
    wanted = token_header.lower().encode("ascii")
    token = ""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            conn.receive_data(await reader.read(READ_SIZE))  # b"": end of stream
        elif isinstance(event, h11.Request):
            for name, value in event.headers:
                if name == wanted:
                    token = value.decode("latin-1")
        elif isinstance(event, h11.EndOfMessage):
            return token
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: the body, discarded as it arrives


def _serialize(conn: h11.Connection, response: http.Response) -> bytes:
    """The response as HTTP/1.1 bytes, framed by Content-Length, closing the connection."""
    body = response.raw_content or b""
    headers = [
        (name, value) for name, value in response.headers.fields if name.lower() not in _FRAMING
    ]
    headers += [(b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
    reason = status_codes.RESPONSES.get(response.status_code, "").encode("ascii")
    head = h11.Response(status_code=response.status_code, headers=headers, reason=reason)
    parts = (head, h11.Data(data=body), h11.EndOfMessage())
    return b"".join(conn.send(part) or b"" for part in parts)
