"""A tiny DNS responder (UDP + TCP, A/AAAA from a dict) and a one-shot client. Stdlib only.

Server, e.g. on the net host:
    python -m tests.harness.dns serve --bind 198.18.5.1 --bind 2001:db8:5::1 \
        --records '{"example.com": ["198.18.5.1", "2001:db8:5::1"]}'
It prints "READY" once every socket is bound, then one JSON line per query answered.
A name may instead map to a crafted answer, sent whatever the query type (a hostile
upstream): {"answer": [[name, type, value, ttl?], ...], "additional": [...],
"question": another name?}, types
A, AAAA and CNAME, e.g. {"x.test": {"answer": [["x.test", "A", "198.18.5.1"],
["other.test", "A", "198.18.5.77"]]}}.

Client, e.g. in the box as an unprivileged uid:
    python -m tests.harness.dns query --server 198.18.5.1 --name example.com [--tcp]
It prints {"status": ..., "answers": [...], "elapsed": ...}; exit 0 only when status is "ok".
Statuses: ok, nxdomain, timeout, refused (ICMP port unreachable / TCP RST),
unreachable (ICMP host/admin-prohibited), denied (EPERM from the local firewall), error.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

QTYPES = {"A": 1, "AAAA": 28}
RCODE_NXDOMAIN = 3


# ----------------------------------------------------------------------- wire format


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if label else b""
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def build_query(name: str, qtype: str = "A", qid: int | None = None) -> bytes:
    qid = random.randrange(65536) if qid is None else qid
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", QTYPES[qtype], 1)


def _parse_question(msg: bytes) -> tuple[int, str, int, int]:
    """Return (id, name, qtype, offset just after the question)."""
    qid = struct.unpack("!H", msg[:2])[0]
    off, labels = 12, []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            break
        labels.append(msg[off : off + n].decode("ascii", "replace"))
        off += n
    qtype, _qclass = struct.unpack("!HH", msg[off : off + 4])
    return qid, ".".join(labels).lower(), qtype, off + 4


#: A crafted answer: {"answer": [[name, type, value, ttl?], ...], "additional": [...],
#: "question": the name it claims to answer, if not the one asked}.
Crafted = Mapping[str, Any]


def _record(entry: Sequence[Any]) -> bytes:
    """One resource record, its owner name written out (no compression)."""
    rname, rtype, value, *rest = entry
    ttl = int(rest[0]) if rest else 60
    if rtype == "CNAME":
        rdata, code = encode_name(str(value)), 5
    else:
        family = socket.AF_INET6 if rtype == "AAAA" else socket.AF_INET
        rdata, code = socket.inet_pton(family, str(value)), QTYPES[rtype]
    return encode_name(str(rname)) + struct.pack("!HHIH", code, 1, ttl, len(rdata)) + rdata


def build_crafted(request: bytes, crafted: Crafted) -> tuple[bytes, dict]:
    qid, name, qtype, qend = _parse_question(request)
    answer = [_record(e) for e in crafted.get("answer", ())]
    extra = [_record(e) for e in crafted.get("additional", ())]
    question = request[12:qend]
    if "question" in crafted:  # an answer to another question than the one asked
        question = encode_name(str(crafted["question"])) + struct.pack("!HH", qtype, 1)
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, len(answer), 0, len(extra))
    log = {"name": name, "qtype": qtype, "rcode": 0, "answers": len(answer)}
    return header + question + b"".join(answer + extra), log


def build_response(
    request: bytes, records: Mapping[str, Sequence[str] | Crafted]
) -> tuple[bytes, dict]:
    qid, name, qtype, qend = _parse_question(request)
    addrs = records.get(name)
    if isinstance(addrs, Mapping):
        return build_crafted(request, addrs)
    rcode = 0 if addrs is not None else RCODE_NXDOMAIN
    answers = []
    for addr in addrs or ():
        is_v6 = ":" in addr
        if qtype == QTYPES["A"] and not is_v6:
            rdata = socket.inet_pton(socket.AF_INET, addr)
        elif qtype == QTYPES["AAAA"] and is_v6:
            rdata = socket.inet_pton(socket.AF_INET6, addr)
        else:
            continue
        answers.append(struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata)
    flags = 0x8180 | rcode  # QR, RD, RA
    header = struct.pack("!HHHHHH", qid, flags, 1, len(answers), 0, 0)
    log = {"name": name, "qtype": qtype, "rcode": rcode, "answers": len(answers)}
    return header + request[12:qend] + b"".join(answers), log


def parse_response(msg: bytes) -> tuple[int, int, list[str]]:
    """Return (id, rcode, addresses) of a response built by build_response or a real server."""
    qid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    out = []
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[off : off + 10])
        off += 10
        rdata = msg[off : off + rdlen]
        off += rdlen
        if rtype == 1:
            out.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28:
            out.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return qid, flags & 0xF, out


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        n = msg[off]
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1
        if n == 0:
            return off
        off += n


# ----------------------------------------------------------------------- server


class DnsServer:
    """Answers on UDP and TCP for each bind address, in daemon threads."""

    def __init__(
        self,
        binds: Sequence[str],
        records: Mapping[str, Sequence[str] | Crafted],
        port: int = 53,
        log: Any = None,
    ) -> None:
        self.records = {
            k.lower().rstrip("."): v if isinstance(v, Mapping) else list(v)
            for k, v in records.items()
        }
        self.queries: list[dict] = []
        self._log = log
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                resp = outer._answer(data, "udp", self.client_address)
                if resp:
                    sock.sendto(resp, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    data = self.rfile.read(struct.unpack("!H", head)[0])
                    resp = outer._answer(data, "tcp", self.client_address)
                    if not resp:
                        return
                    self.wfile.write(struct.pack("!H", len(resp)) + resp)

        for addr in binds:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            for base, handler in (
                (socketserver.ThreadingUDPServer, Udp),
                (socketserver.ThreadingTCPServer, Tcp),
            ):
                cls = type("S", (base,), {"address_family": family, "allow_reuse_address": True})
                cls.daemon_threads = True
                self._servers.append(cls((addr, port), handler))

    def _answer(self, data: bytes, proto: str, client: Any) -> bytes | None:
        try:
            resp, entry = build_response(data, self.records)
        except (IndexError, struct.error, KeyError):
            return None
        entry.update(proto=proto, client=client[0], port=client[1], t=time.time())
        with self._lock:
            self.queries.append(entry)
            if self._log is not None:
                print(json.dumps(entry), file=self._log, flush=True)
        return resp

    def start(self) -> DnsServer:
        for s in self._servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------- client


def query(
    server: str,
    name: str,
    qtype: str = "A",
    tcp: bool = False,
    port: int = 53,
    timeout: float = 2.0,
    source_port: int = 0,
) -> dict[str, Any]:
    """Send one query (from `source_port`, 0: any); report {"status", "answers",
    "elapsed", "error"}."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    msg = build_query(name, qtype)
    start = time.monotonic()
    result: dict[str, Any] = {"status": "error", "answers": [], "error": None}
    try:
        with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            if source_port:
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
            s.connect((server, port))
            if tcp:
                s.sendall(struct.pack("!H", len(msg)) + msg)
                head = _recv_exact(s, 2)
                data = _recv_exact(s, struct.unpack("!H", head)[0])
            else:
                s.send(msg)
                data = s.recv(4096)
        _qid, rcode, answers = parse_response(data)
        result["answers"] = answers
        result["status"] = "ok" if rcode == 0 else ("nxdomain" if rcode == 3 else f"rcode{rcode}")
    except TimeoutError:
        result["status"] = "timeout"
    except OSError as exc:
        result["error"] = f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"
        if exc.errno == errno.ECONNREFUSED:
            result["status"] = "refused"
        elif exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES):
            result["status"] = "unreachable"
        elif exc.errno == errno.EPERM:
            result["status"] = "denied"
    result["elapsed"] = round(time.monotonic() - start, 3)
    return result


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed")
        buf += chunk
    return buf


# ----------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.dns")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--bind", action="append", required=True)
    sv.add_argument("--port", type=int, default=53)
    sv.add_argument("--records", default="{}", help="JSON object: name -> [addresses]")
    q = sub.add_parser("query")
    q.add_argument("--server", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("--type", default="A", choices=sorted(QTYPES))
    q.add_argument("--tcp", action="store_true")
    q.add_argument("--port", type=int, default=53)
    q.add_argument("--timeout", type=float, default=2.0)
    q.add_argument("--source-port", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        DnsServer(args.bind, json.loads(args.records), args.port, log=sys.stdout).start()
        print("READY", flush=True)
        threading.Event().wait()
        return 0
    res = query(
        args.server, args.name, args.type, args.tcp, args.port, args.timeout, args.source_port
    )
    print(json.dumps(res))
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
