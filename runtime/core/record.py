"""The traffic log's records: one dataclass per kind of line, the only list of its fields.

A line's fields, their order, the writer's encoding (runtime.trafficlog) and
the schema test all derive from these classes; config/traffic-log.schema.json
describes the same fields for readers. Every line says what it is (`kind`)
and which version of the format it follows (`v`), so a reader can tell lines
apart before reading any other field.

What never goes in: query strings, header values, bodies, credentials. Only
the fields below exist, and `path` loses any query or fragment here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

#: The format version every line carries as `v`. A change that a reader of an
#: earlier version would misread (a field renamed, retyped or given another
#: meaning) takes the next number.
SCHEMA_VERSION = 1

#: HttpRecord.phase: judged, nothing forwarded yet / the request is over.
START = "start"
END = "end"


@dataclass(slots=True, kw_only=True)
class HttpRecord:
    """An HTTP request (each request of a keep-alive connection, every HTTP/2 stream,
    WebSocket upgrades), or a connection closed because it was not HTTP: then
    `method`, `path` and `http_version` are None, nothing of a request was seen.

    A request has two lines with the same `id`: `phase` "start", written once it is
    judged and before any of it is forwarded (no status, duration or byte counts
    yet), and "end" when the response completed or the request failed. A request
    that reached the upstream therefore has its start line even if the interceptor
    died before the end. A connection closed as not HTTP has one "end" line.
    """

    kind: str = field(default="http", init=False)
    v: int = field(default=SCHEMA_VERSION, init=False)
    phase: str  # START / END
    id: str  # the same in a request's start and end lines
    ts: str  # format_ts() of when the request started
    action: str  # ALLOW / BLOCK
    violation: bool
    mode: str
    reason: str
    rule: str | None
    rule_source: str | None
    method: str | None
    scheme: str
    host: str
    port: int
    path: str | None
    status: int | None
    http_version: str | None
    duration_ms: float | None  # None on a start line, as the byte counts
    bytes_out: int | None
    bytes_in: int | None

    def __post_init__(self) -> None:
        # The path is already normalised by the core; drop a query defensively.
        self.path = strip_query(self.path)
        self.violation = bool(self.violation)
        self.port = int(self.port)
        if self.duration_ms is not None:
            self.duration_ms = milliseconds(self.duration_ms)
        if self.bytes_out is not None:
            self.bytes_out = max(int(self.bytes_out), 0)
        if self.bytes_in is not None:
            self.bytes_in = max(int(self.bytes_in), 0)


@dataclass(slots=True, kw_only=True)
class DnsRecord:
    """A query the DNS guard answered (forwarded, or refused with NXDOMAIN)."""

    kind: str = field(default="dns", init=False)
    v: int = field(default=SCHEMA_VERSION, init=False)
    ts: str
    action: str
    violation: bool
    mode: str
    reason: str
    rule: str | None
    rule_source: str | None
    host: str
    qtype: str
    transport: str  # udp / tcp
    rcode: str
    answers: int
    duration_ms: float
    #: A name a rule gives `ports`: the address:port endpoints the firewall opened for
    #: this answer (None: not such a name, or the port keeper did not confirm).
    opened: list[str] | None = None

    def __post_init__(self) -> None:
        self.violation = bool(self.violation)
        self.answers = max(int(self.answers), 0)
        self.duration_ms = milliseconds(self.duration_ms)


Record = HttpRecord | DnsRecord

#: Each kind's fields, in the order they are written.
HTTP_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(HttpRecord))
DNS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DnsRecord))
FIELDS_OF: dict[type, tuple[str, ...]] = {HttpRecord: HTTP_FIELDS, DnsRecord: DNS_FIELDS}
KINDS: dict[str, type] = {"http": HttpRecord, "dns": DnsRecord}


def to_dict(record: Record) -> dict[str, Any]:
    """The line's object: every field of its kind, in order."""
    return {name: getattr(record, name) for name in FIELDS_OF[type(record)]}


def strip_query(path: str | None) -> str | None:
    return None if path is None else path.split("?", 1)[0].split("#", 1)[0] or "/"


def milliseconds(value: float) -> float:
    return round(max(value, 0.0), 3)


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
