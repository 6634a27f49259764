"""The traffic log: /logs/traffic.jsonl, one JSON object per request.

The schema lives here (FIELDS, make_record) and in config/traffic-log.schema.json;
a unit test keeps the two in step. What is never written: query strings,
header values, bodies, credentials. Only the values named in FIELDS go in,
and `path` is the policy core's normalised path (no query, no fragment).

A connection closed because it was not HTTP (reason `not_http`, no request to
speak of) has null `method`, `path` and `http_version`: they were never seen.

Every line is written with one os.write() on an O_APPEND descriptor: the
kernel appends it whole, so lines of several writer processes never
interleave or break.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from runtime import paths

#: Every field of a log line, in the order written. All are always present.
FIELDS: tuple[str, ...] = (
    "ts",
    "action",
    "violation",
    "mode",
    "reason",
    "rule",
    "rule_source",
    "method",
    "scheme",
    "host",
    "port",
    "path",
    "status",
    "http_version",
    "duration_ms",
    "bytes_out",
    "bytes_in",
)

#: A DNS guard record (`kind: "dns"`): one per query, in the order written.
DNS_FIELDS: tuple[str, ...] = (
    "kind",
    "ts",
    "action",
    "violation",
    "mode",
    "reason",
    "rule",
    "rule_source",
    "host",
    "qtype",
    "transport",
    "rcode",
    "answers",
    "duration_ms",
)

SCHEMA_FILE = "traffic-log.schema.json"


def schema_path() -> Path:
    return paths.share_dir() / SCHEMA_FILE


#: The last second formatted: lines come many per second, strftime is the slow part.
_last_second: tuple[datetime | None, str] = (None, "")


def format_ts(epoch: float) -> str:
    """UTC, RFC 3339 with milliseconds: 2026-11-28T08:00:00.123Z."""
    global _last_second
    moment = datetime.fromtimestamp(epoch, UTC)
    second = moment.replace(microsecond=0)
    cached, prefix = _last_second
    if cached != second:
        prefix = second.strftime("%Y-%m-%dT%H:%M:%S.")
        _last_second = (second, prefix)
    return prefix + f"{moment.microsecond // 1000:03d}Z"


def make_record(
    *,
    ts: float,
    action: str,
    violation: bool,
    mode: str,
    reason: str,
    rule: str | None,
    rule_source: str | None,
    method: str | None,
    scheme: str,
    host: str,
    port: int,
    path: str | None,
    status: int | None,
    http_version: str | None,
    duration_ms: float,
    bytes_out: int,
    bytes_in: int,
) -> dict[str, Any]:
    """One log line's object. Keyword-only, so a new field is a change here and in the schema."""
    return {
        "ts": format_ts(ts),
        "action": action,
        "violation": bool(violation),
        "mode": mode,
        "reason": reason,
        "rule": rule,
        "rule_source": rule_source,
        "method": method,
        "scheme": scheme,
        "host": host,
        # The path is already normalised by the core; drop a query defensively.
        "port": int(port),
        "path": None if path is None else path.split("?", 1)[0].split("#", 1)[0] or "/",
        "status": status,
        "http_version": http_version,
        "duration_ms": round(max(duration_ms, 0.0), 3),
        "bytes_out": max(int(bytes_out), 0),
        "bytes_in": max(int(bytes_in), 0),
    }


def make_dns_record(
    *,
    ts: float,
    action: str,
    violation: bool,
    mode: str,
    reason: str,
    rule: str | None,
    rule_source: str | None,
    host: str,
    qtype: str,
    transport: str,
    rcode: str,
    answers: int,
    duration_ms: float,
) -> dict[str, Any]:
    """One DNS guard line's object (see DNS_FIELDS)."""
    return {
        "kind": "dns",
        "ts": format_ts(ts),
        "action": action,
        "violation": bool(violation),
        "mode": mode,
        "reason": reason,
        "rule": rule,
        "rule_source": rule_source,
        "host": host,
        "qtype": qtype,
        "transport": transport,
        "rcode": rcode,
        "answers": max(int(answers), 0),
        "duration_ms": round(max(duration_ms, 0.0), 3),
    }


#: json.dumps with separators builds a new encoder per call; this one is built once.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_line(record: Mapping[str, Any]) -> bytes:
    """The bytes of one line: compact ASCII JSON and a newline, so one line is one write."""
    fields = DNS_FIELDS if record.get("kind") == "dns" else FIELDS
    text = _ENCODER.encode({key: record[key] for key in fields})
    return text.encode("ascii") + b"\n"


class TrafficLogWriter:
    """Appends lines to the traffic log, opening the file lazily and keeping it open.

    If the file is replaced or removed (log rotation, the log guard repairing
    tampering), the next write after `recheck_seconds` notices and reopens it.
    Write errors are reported and never raised: logging must not break traffic.
    """

    def __init__(self, path: Path | str | None = None, recheck_seconds: float = 1.0) -> None:
        self.path = Path(path) if path is not None else paths.traffic_log()
        self.recheck_seconds = recheck_seconds
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._checked = 0.0
        self._failing = False

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(fd)
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        self._checked = time.monotonic()
        return fd

    def _current_fd(self) -> int:
        if self._fd is None:
            return self._open()
        now = time.monotonic()
        if now - self._checked >= self.recheck_seconds:
            self._checked = now
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._inode
            except FileNotFoundError:
                same = False
            if not same:
                self.close()
                return self._open()
        return self._fd

    def write(self, record: Mapping[str, Any]) -> bool:
        data = encode_line(record)
        try:
            fd = self._current_fd()
            written = os.write(fd, data)
            if written != len(data):  # only on a full disk; the rest would break the line
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            if not self._failing:
                logger.error("traffic log {}: cannot write ({}); lines are lost", self.path, exc)
            self._failing = True
            self.close()
            return False
        if self._failing:
            logger.info("traffic log {}: writing again", self.path)
            self._failing = False
        return True

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def read_lines(path: Path | str) -> list[dict[str, Any]]:
    """Parse a traffic log (tests and tooling)."""
    text = Path(path).read_text(encoding="ascii")
    return [json.loads(line) for line in text.splitlines() if line]
