"""Reading the traffic log on the host: entries, filters, lines, a summary, follow.

The log is JSON Lines (config/traffic-log.schema.json). A reader must cope with
what a crash or a full disk leaves (a broken last line), with lines of older
and newer schema versions, and with requests recorded as more than one line
(a line when the request leaves and one when it completes, sharing an `id`):
those are merged, the later line's fields winning.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from runtime.core.suggest import Seen

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Entry:
    """One request (or DNS query) as the log recorded it."""

    ts: datetime
    kind: str
    action: str  # ALLOW or BLOCK
    violation: bool
    reason: str
    host: str
    method: str = ""
    path: str = ""
    scheme: str = ""
    port: int | None = None
    status: int | None = None
    rule: str | None = None
    mode: str = ""
    qtype: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def blocked(self) -> bool:
        return self.action.upper() == "BLOCK"

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Entry | None:
        try:
            ts = datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00"))
            host = _text(record.get("host"))
            action = str(record["action"])
        except (KeyError, ValueError):
            return None
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        port = record.get("port")
        status = record.get("status")
        rule = record.get("rule")
        return cls(
            ts=ts,
            kind=str(record.get("kind") or ("dns" if "qtype" in record else "http")),
            action=action,
            violation=bool(record.get("violation")),
            reason=_text(record.get("reason")),
            host=host,
            method=_text(record.get("method")),
            path=_text(record.get("path")),
            scheme=_text(record.get("scheme")),
            port=int(port) if isinstance(port, int) else None,
            status=int(status) if isinstance(status, int) else None,
            rule=None if rule is None else _text(rule),
            mode=_text(record.get("mode")),
            qtype=_text(record.get("qtype")),
            raw=record,
        )


def _text(value: Any) -> str:
    """A field as text fit for a terminal: control and format characters escaped, so a
    line of the log (which shows what the agent asked for) cannot move the cursor,
    clear the screen or reorder what is shown."""
    text = str(value or "")
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


@dataclass
class Read:
    entries: list[Entry]
    broken: int  # lines that were not a whole JSON object (a crash, a full disk)


def parse_lines(lines: Iterable[str]) -> Read:
    """Entries from log lines, requests recorded in several lines merged by `id`."""
    merged: dict[str, dict[str, Any]] = {}
    order: list[dict[str, Any]] = []
    broken = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            broken += 1
            continue
        if not isinstance(record, dict):
            broken += 1
            continue
        key = record.get("id")
        if key is not None and str(key) in merged:
            first_ts = merged[str(key)].get("ts")
            merged[str(key)].update(record)
            if first_ts is not None:
                merged[str(key)]["ts"] = first_ts  # when the request was made
            continue
        record = dict(record)
        if key is not None:
            merged[str(key)] = record
        order.append(record)
    entries = [e for e in (Entry.from_record(r) for r in order) if e is not None]
    broken += len(order) - len(entries)
    return Read(entries, broken)


def read_log(path: Path) -> Read:
    """The log at `path`; a missing file is an empty log."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_lines(handle)
    except FileNotFoundError:
        return Read([], 0)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`2h`, `30m`, `1d12h`, or an ISO time (`2026-11-29T08:00`, taken as UTC)."""
    now = now or datetime.now(UTC)
    spec = text.strip().lower()
    if _DURATION.fullmatch(spec) or re.fullmatch(rf"(?:{_DURATION.pattern}\s*)+", spec):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(spec))
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration such as 2h, 30m or 1d, or a time such as "
            "2026-11-29T08:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def select(
    entries: Iterable[Entry],
    blocked: bool = False,
    violations: bool = False,
    since: datetime | None = None,
    kind: str | None = None,
) -> list[Entry]:
    """Entries matching every filter given (blocked and violations together: either)."""
    out = []
    for e in entries:
        if since is not None and e.ts < since:
            continue
        if kind is not None and e.kind != kind:
            continue
        if (blocked or violations) and not (
            (blocked and e.blocked) or (violations and e.violation)
        ):
            continue
        out.append(e)
    return out


_COLOURS = {"BLOCK": "\x1b[31m", "VIOLATION": "\x1b[33m", "ALLOW": "\x1b[32m"}
_RESET = "\x1b[0m"


def verdict(entry: Entry) -> str:
    if entry.blocked:
        return "BLOCK"
    return "VIOLATION" if entry.violation else "ALLOW"


def format_entry(entry: Entry, colour: bool = False) -> str:
    """One readable line: time, verdict, method, host, path, reason, rule."""
    when = entry.ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    word = verdict(entry)
    shown = f"{_COLOURS[word]}{word:<9}{_RESET}" if colour else f"{word:<9}"
    if entry.kind == "dns":
        what = f"DNS {entry.qtype or '?':<5} {entry.host}"
    else:
        port = (
            f":{entry.port}"
            if entry.port and entry.port not in (80, 443) and entry.port is not None
            else ""
        )
        plain = "http://" if entry.scheme == "http" else ""  # https is the rule: unmarked
        what = f"{entry.method or '-':<7} {plain}{entry.host}{port}{entry.path}"
    rule = f" (rule: {entry.rule})" if entry.rule else ""
    status = f" {entry.status}" if entry.status is not None else ""
    return f"{when}  {shown} {what}  {entry.reason}{status}{rule}"


@dataclass
class HostSummary:
    host: str
    requests: int = 0
    blocked: int = 0
    violations: int = 0
    first: datetime | None = None
    last: datetime | None = None
    paths: dict[str, int] = field(default_factory=dict)


def summarize(entries: Iterable[Entry]) -> list[HostSummary]:
    """Per host: requests, blocked, violations, first and last seen, paths seen."""
    hosts: dict[str, HostSummary] = {}
    for e in entries:
        s = hosts.setdefault(e.host, HostSummary(e.host))
        s.requests += 1
        s.blocked += e.blocked
        s.violations += e.violation
        s.first = e.ts if s.first is None or e.ts < s.first else s.first
        s.last = e.ts if s.last is None or e.ts > s.last else s.last
        if e.kind == "http" and e.path:
            s.paths[e.path] = s.paths.get(e.path, 0) + 1
    return sorted(hosts.values(), key=lambda s: (-s.requests, s.host))


def format_summary(summaries: Iterable[HostSummary], max_paths: int = 8) -> list[str]:
    lines = []
    for s in summaries:
        first = s.first.strftime("%Y-%m-%d %H:%M") if s.first else "-"
        last = s.last.strftime("%Y-%m-%d %H:%M") if s.last else "-"
        lines.append(
            f"{s.host}: {s.requests} requests, {s.blocked} blocked, {s.violations} violations "
            f"(first {first}, last {last})"
        )
        top = sorted(s.paths.items(), key=lambda kv: (-kv[1], kv[0]))
        lines += [f"    {count:>5}  {path}" for path, count in top[:max_paths]]
        if len(top) > max_paths:
            lines.append(f"    ... and {len(top) - max_paths} more paths")
    return lines


def to_seen(entries: Iterable[Entry]) -> list[Seen]:
    """HTTP entries as the core's suggest/replay take them."""
    return [
        Seen(
            method=e.method,
            host=e.host,
            path=e.path or "/",
            scheme=e.scheme or "https",
            port=e.port or (80 if e.scheme == "http" else 443),
            blocked=e.blocked,
            violation=e.violation,
        )
        for e in entries
        if e.kind == "http" and e.method and e.reason != "not_http"
    ]


def end_of_run_line(entries: Iterable[Entry], command: str, top: int = 3) -> str | None:
    """One line for stderr after a run in which something was blocked or flagged."""
    flagged = [e for e in entries if e.blocked or e.violation]
    if not flagged:
        return None
    blocked = sum(e.blocked for e in flagged)
    counts: dict[str, int] = {}
    for e in flagged:
        counts[e.host] = counts.get(e.host, 0) + 1
    hosts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{h} x{n}" if n > 1 else h for h, n in hosts[:top])
    more = f" and {len(hosts) - top} more" if len(hosts) > top else ""
    what = []
    if blocked:
        what.append(f"{blocked} blocked")
    if len(flagged) - blocked:
        what.append(f"{len(flagged) - blocked} flagged (monitor)")
    return f"[Network] {' and '.join(what)} this run: {shown}{more}. See: {command}"


def completed(lines: Iterable[str], held: dict[str, dict[str, Any]]) -> list[Entry]:
    """Entries from lines appended to a log, each shown once: a request's start line is
    held (in `held`, by id) until its end line comes, so a request prints when it is
    over, with its status; a line of no phase (DNS, older versions) prints at once."""
    records: list[Mapping[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        key = record.get("id")
        if key is not None and record.get("phase") == "start":
            held[str(key)] = record
            continue
        if key is not None and str(key) in held:
            start = held.pop(str(key))
            record = {**start, **record, "ts": start.get("ts", record.get("ts"))}
        records.append(record)
    return [e for e in (Entry.from_record(r) for r in records) if e is not None]


def read_whole_lines(path: Path) -> tuple[Read, int]:
    """The log up to its last complete line, and that line's end offset: where a
    follow() picks up, so nothing written meanwhile (a half line included) is lost."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return Read([], 0), 0
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", errors="replace")
    return parse_lines(text.splitlines()), end


def follow(
    path: Path,
    out: TextIO,
    render: Any,
    poll: float = 0.25,
    keep: Any = None,
    offset: int | None = None,
) -> Iterator[None]:
    """Print new entries as they are appended, reopening the file when it is replaced;
    `keep` (an Entry predicate) filters them. A request prints once, when it is over.
    The first file is followed from `offset` (read_whole_lines), else from its end.

    A generator so the caller decides when to stop (Ctrl-C, a test's bound)."""
    held: dict[str, dict[str, Any]] = {}
    handle = None
    inode = None
    pending = ""
    first = True  # the first file is followed from its end; a replacement from its start
    while True:
        if handle is None:
            try:
                handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                inode = os.fstat(handle.fileno()).st_ino
                pending = ""  # a half line of the old file is not the start of a new one
                if first and offset is not None:
                    handle.seek(offset)
                elif first:
                    handle.seek(0, os.SEEK_END)
            except FileNotFoundError:
                handle = None
            first = False
        if handle is not None:
            chunk = handle.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                for entry in completed(lines, held):
                    if keep is None or keep(entry):
                        print(render(entry), file=out, flush=True)
            try:
                if os.stat(path).st_ino != inode:
                    handle.close()
                    handle = None
            except FileNotFoundError:
                handle.close()
                handle = None
        yield
        time.sleep(poll)
