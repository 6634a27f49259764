"""The block sink: drains a blocked request's streamed body, answers with its 403."""

from __future__ import annotations

import asyncio

from mitmproxy import http
from mitmproxy.test import tflow

from runtime.container.interceptor.blocksink import BlockSink


async def _exchange(sink: BlockSink, raw: bytes) -> bytes:
    assert sink.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def test_diverted_request_gets_its_403_once_whatever_the_framing() -> None:
    async def scenario() -> list[bytes]:
        sink = BlockSink()
        await sink.running()
        answers = []
        for framing in ("length", "chunked"):
            flow = tflow.tflow()
            response = http.Response.make(403, b"BLOCKED: explained\n", {"X-Why": "test"})
            assert sink.divert(flow, response)
            assert (flow.request.host, flow.request.port) == ("127.0.0.1", sink.port)
            token = flow.request.headers[BlockSink.TOKEN_HEADER]
            body = b"x" * 300_000
            # mitmproxy sends HTTP/1.1 with a Host header (mandatory, RFC 9112 3.2).
            if framing == "length":
                head = f"POST /u HTTP/1.1\r\nHost: evil.test\r\nContent-Length: {len(body)}\r\n"
                payload = body
            else:
                head = "POST /u HTTP/1.1\r\nHost: evil.test\r\nTransfer-Encoding: chunked\r\n"
                payload = (
                    b"".join(
                        b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:1000], body[1000:])
                    )
                    + b"0\r\nX-Trailer: 1\r\n\r\n"
                )
            raw = f"{head}{BlockSink.TOKEN_HEADER}: {token}\r\n\r\n".encode() + payload
            answers.append(await _exchange(sink, raw))
            # The token is single use: replaying it gets the generic answer.
            answers.append(await _exchange(sink, raw))
        await sink.done()
        return answers

    first, replay, chunked, _ = asyncio.run(scenario())
    for answer in (first, chunked):
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"\r\nX-Why: test\r\n" in answer and b"\r\nContent-Length: 19\r\n" in answer
        assert answer.endswith(b"\r\n\r\nBLOCKED: explained\n")
    assert replay.startswith(b"HTTP/1.1 403") and b"explained" not in replay


def test_without_a_running_sink_nothing_is_diverted() -> None:
    flow = tflow.tflow()
    assert BlockSink().divert(flow, http.Response.make(403)) is False
    assert flow.request.host != "127.0.0.1"


def test_expect_100_continue_gets_its_interim_answer_first() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        sink = BlockSink()
        await sink.running()
        flow = tflow.tflow()
        assert sink.divert(flow, http.Response.make(403, b"no\n"))
        token = flow.request.headers[BlockSink.TOKEN_HEADER]
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        writer.write(
            b"PUT /u HTTP/1.1\r\nHost: evil.test\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\n" + f"{BlockSink.TOKEN_HEADER}: {token}\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"abc")
        final = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await sink.done()
        return interim, final

    interim, final = asyncio.run(scenario())
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert final.startswith(b"HTTP/1.1 403 Forbidden\r\n") and final.endswith(b"\r\n\r\nno\n")
