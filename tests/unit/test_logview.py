"""Reading the traffic log on the host (runtime.host.logview)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runtime.host import logview


def rec(**kw) -> dict:
    base = {
        "kind": "http",
        "v": 1,
        "ts": "2026-11-29T08:00:00.000Z",
        "action": "ALLOW",
        "violation": False,
        "mode": "enforce",
        "reason": "rule_match",
        "rule": "api.github.com",
        "method": "GET",
        "scheme": "https",
        "host": "api.github.com",
        "port": 443,
        "path": "/user",
        "status": 200,
    }
    base.update(kw)
    return base


def lines(*records) -> list[str]:
    return [json.dumps(r) for r in records]


def test_broken_lines_are_counted_not_fatal() -> None:
    read = logview.parse_lines([*lines(rec()), '{"ts": "2026-', "[1]", "", *lines(rec(path="/x"))])
    assert [e.path for e in read.entries] == ["/user", "/x"]
    assert read.broken == 2


def test_lines_of_one_request_merge_by_id() -> None:
    start = rec(id="r1", status=None, ts="2026-11-29T08:00:00.000Z")
    end = {"id": "r1", "status": 201, "ts": "2026-11-29T08:00:05.000Z"}
    (entry,) = logview.parse_lines(lines(start, end)).entries
    assert entry.status == 201 and entry.ts == datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def test_filters_and_since() -> None:
    entries = logview.parse_lines(
        lines(
            rec(),
            rec(action="BLOCK", reason="host_not_allowed", host="evil.test", rule=None),
            rec(mode="monitor", violation=True, reason="path_not_allowed", path="/admin"),
            rec(ts="2026-11-28T08:00:00.000Z", action="BLOCK", host="old.test"),
            {
                "kind": "dns",
                "v": 1,
                "ts": "2026-11-29T08:00:01.000Z",
                "action": "BLOCK",
                "violation": False,
                "reason": "host_not_allowed",
                "host": "x.evil.test",
                "qtype": "A",
            },
        )
    ).entries
    now = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    since = logview.parse_since("2h", now)
    assert [e.host for e in logview.select(entries, blocked=True, since=since)] == [
        "evil.test",
        "x.evil.test",
    ]
    assert [e.path for e in logview.select(entries, violations=True)] == ["/admin"]
    assert len(logview.select(entries, blocked=True, violations=True)) == 4
    assert [e.host for e in logview.select(entries, kind="dns")] == ["x.evil.test"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("2h", 7200), ("30m", 1800), ("1d12h", 129600), ("45s", 45)]
)
def test_parse_since_durations(text: str, seconds: int) -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert (now - logview.parse_since(text, now)).total_seconds() == seconds


def test_parse_since_times_and_errors() -> None:
    assert logview.parse_since("2026-11-29T08:00") == datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="give a duration such as 2h"):
        logview.parse_since("yesterday")


def test_format_line_and_colour() -> None:
    blocked = logview.Entry.from_record(
        rec(
            action="BLOCK",
            reason="host_not_allowed",
            host="evil.test",
            path="/x",
            rule=None,
            status=403,
        )
    )
    assert blocked is not None
    assert logview.format_entry(blocked) == (
        "2026-11-29 08:00:00  BLOCK     GET     evil.test/x  host_not_allowed 403"
    )
    assert "\x1b[31mBLOCK" in logview.format_entry(blocked, colour=True)
    dns = logview.Entry.from_record(
        {
            "kind": "dns",
            "ts": "2026-11-29T08:00:00Z",
            "action": "ALLOW",
            "reason": "rule_match",
            "host": "api.github.com",
            "qtype": "AAAA",
            "rule": "api.github.com",
        }
    )
    assert dns is not None
    assert logview.format_entry(dns).endswith(
        "DNS AAAA  api.github.com  rule_match (rule: api.github.com)"
    )


def test_summary_per_host() -> None:
    entries = logview.parse_lines(
        lines(rec(), rec(path="/user/repos"), rec(path="/user"), rec(action="BLOCK", host="e.test"))
    ).entries
    first, second = logview.summarize(entries)
    assert (first.host, first.requests, first.blocked, first.paths) == (
        "api.github.com",
        3,
        0,
        {"/user": 2, "/user/repos": 1},
    )
    text = logview.format_summary([first, second])
    assert text[0].startswith("api.github.com: 3 requests, 0 blocked, 0 violations (first 2026")
    assert text[1] == "        2  /user"


def test_end_of_run_line() -> None:
    entries = logview.parse_lines(
        lines(
            rec(),
            rec(action="BLOCK", host="evil.test"),
            rec(action="BLOCK", host="evil.test"),
            rec(violation=True, host="m.test"),
        )
    ).entries
    line = logview.end_of_run_line(entries, "copilot_here --network-logs --blocked")
    assert line == (
        "[Network] 2 blocked and 1 flagged (monitor) this run: evil.test x2, m.test. "
        "See: copilot_here --network-logs --blocked"
    )
    assert logview.end_of_run_line(entries[:1], "x") is None


def test_to_seen_skips_dns_and_not_http() -> None:
    entries = logview.parse_lines(
        lines(
            rec(),
            rec(reason="not_http", method=None, path=None),
            {"kind": "dns", "ts": "2026-11-29T08:00:00Z", "action": "ALLOW", "host": "a"},
        )
    ).entries
    assert [(s.method, s.host, s.path) for s in logview.to_seen(entries)] == [
        ("GET", "api.github.com", "/user")
    ]


def test_follow_prints_appended_lines_and_survives_replacement(tmp_path: Path) -> None:
    log = tmp_path / "traffic.jsonl"
    log.write_text(json.dumps(rec(path="/old")) + "\n")
    out = io.StringIO()
    steps = logview.follow(log, out, lambda e: e.path, poll=0)
    next(steps)
    with open(log, "a") as handle:
        handle.write(json.dumps(rec(path="/new")) + "\n" + json.dumps(rec(path="/half"))[:10])
    next(steps)
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps(rec(path="/rotated")) + "\n")
    replacement.replace(log)
    next(steps)
    next(steps)
    assert out.getvalue().split() == ["/new", "/rotated"]


def test_follow_prints_a_request_once_when_it_is_over(tmp_path: Path) -> None:
    log = tmp_path / "traffic.jsonl"
    log.write_text("")
    out = io.StringIO()
    steps = logview.follow(
        log, out, lambda e: f"{e.path} {e.status}", poll=0, keep=lambda e: e.host != "skip.test"
    )
    next(steps)
    with open(log, "a") as handle:
        handle.write(json.dumps(rec(id="a", phase="start", path="/slow", status=None)) + "\n")
        handle.write(json.dumps(rec(id="b", phase="start", host="skip.test", status=None)) + "\n")
    next(steps)
    assert out.getvalue() == ""  # in flight: not shown yet
    with open(log, "a") as handle:
        handle.write(json.dumps(rec(id="a", phase="end", path="/slow", status=201)) + "\n")
        handle.write(json.dumps(rec(id="b", phase="end", host="skip.test")) + "\n")
    next(steps)
    assert out.getvalue().splitlines() == ["/slow 201"]


def test_what_the_agent_sent_cannot_drive_the_terminal() -> None:
    """Paths and hosts in the log are the agent's choice: shown escaped, never raw."""
    hostile = rec(path="/x\x1b[2J\x1b]0;owned\x07\u202e", host="a.test\r", method="GET\x1b")
    (entry,) = logview.parse_lines(lines(hostile)).entries
    shown = [
        logview.format_entry(entry),
        *logview.format_summary(logview.summarize([entry])),
        logview.end_of_run_line([logview.Entry.from_record({**hostile, "action": "BLOCK"})], "c"),
    ]
    for text in shown:
        assert text is not None
        assert not any(ord(c) < 32 or c in "\x7f\u202e" for c in text), repr(text)
    assert "\\x1b[2J" in shown[0] and "\\u202e" in shown[0]


def test_plain_http_is_marked() -> None:
    (entry,) = logview.parse_lines(lines(rec(scheme="http", port=80, path="/p"))).entries
    assert "GET     http://api.github.com/p  rule_match 200" in logview.format_entry(entry)
