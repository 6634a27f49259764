"""The traffic log: schema in step with the writer, timestamps, whole lines under concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import jsonschema
import pytest

from runtime.trafficlog import (
    FIELDS,
    TrafficLogWriter,
    encode_line,
    format_ts,
    make_record,
    read_lines,
    schema_path,
)


def sample(**over) -> dict:
    values = dict(
        ts=1795852800.1234,
        action="ALLOW",
        violation=False,
        mode="enforce",
        reason="rule_match",
        rule="api.github.com",
        rule_source="built-in",
        method="GET",
        scheme="https",
        host="api.github.com",
        port=443,
        path="/repos/x",
        status=200,
        http_version="HTTP/1.1",
        duration_ms=12.34567,
        bytes_out=0,
        bytes_in=512,
    )
    values.update(over)
    return make_record(**values)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(schema_path().read_text())


def test_schema_and_writer_name_the_same_fields(schema):
    assert tuple(schema["required"]) == FIELDS
    assert set(schema["properties"]) == set(FIELDS)
    assert schema["additionalProperties"] is False
    assert tuple(sample()) == FIELDS


def test_sample_records_validate(schema):
    jsonschema.validate(sample(), schema)
    jsonschema.validate(sample(rule=None, rule_source=None, status=None), schema)
    jsonschema.validate(sample(mode="monitor", violation=True, reason="host_mismatch"), schema)


@pytest.mark.parametrize(
    "bad",
    [
        {"action": "allow"},
        {"path": "/x?token=1"},
        {"mode": "audit"},
        {"status": "200"},
        {"ts": "2026-11-28T08:00:00Z"},
        {"port": 70000},
        {"bytes_in": -1},
    ],
)
def test_schema_rejects_bad_values(schema, bad):
    record = sample()
    record.update(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, schema)


NOT_HTTP = dict(
    action="BLOCK",
    reason="not_http",
    rule=None,
    rule_source=None,
    method=None,
    path=None,
    http_version=None,
    status=None,
    bytes_in=0,
)


def test_not_http_connection_line_has_no_method_path_or_version(schema):
    record = sample(**NOT_HTTP)
    jsonschema.validate(record, schema)
    assert (record["method"], record["path"], record["http_version"]) == (None, None, None)
    # A refused upgrade is an HTTP request: it keeps them.
    jsonschema.validate(sample(action="BLOCK", reason="not_http", status=403), schema)
    jsonschema.validate(sample(**NOT_HTTP, mode="monitor"), schema)


@pytest.mark.parametrize(
    "bad",
    [
        {"reason": "host_not_allowed"},  # only not_http may lack method, path, version
        {"action": "ALLOW"},  # not_http is always a block...
        {"mode": "monitor", "violation": True},  # ...never a monitor-mode violation
        {"reason": "rule_match", "method": None, "path": "/", "http_version": "HTTP/1.1"},
    ],
)
def test_schema_rejects_inconsistent_not_http_lines(schema, bad):
    record = sample(**NOT_HTTP)
    record.update(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, schema)


def test_schema_rejects_extra_fields(schema):
    record = sample()
    record["authorization"] = "Bearer x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, schema)


def test_timestamp_is_utc_rfc3339_with_milliseconds():
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts(1795852800.1239) == "2026-11-28T08:00:00.123Z"


def test_query_never_reaches_the_line():
    assert sample(path="/repos/x?access_token=abc#frag")["path"] == "/repos/x"


def test_line_is_compact_ascii_json_with_one_newline():
    line = encode_line(sample(host="xn--bcher-kva.example"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == sample(host="xn--bcher-kva.example")
    assert b": " not in line


def test_writer_appends_creates_0644_and_reopens_replaced_file(tmp_path):
    path = tmp_path / "traffic.jsonl"
    writer = TrafficLogWriter(path, recheck_seconds=0)
    assert not path.exists()  # lazily opened
    assert writer.write(sample())
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644 & ~umask
    path.rename(tmp_path / "rotated.jsonl")
    assert writer.write(sample(status=404))
    assert [r["status"] for r in read_lines(path)] == [404]
    assert [r["status"] for r in read_lines(tmp_path / "rotated.jsonl")] == [200]
    writer.close()


def test_write_failure_is_reported_not_raised(tmp_path):
    writer = TrafficLogWriter(tmp_path / "missing-dir" / "traffic.jsonl")
    assert writer.write(sample()) is False


def _hammer(path: str, worker: int, count: int) -> None:
    writer = TrafficLogWriter(path)
    for i in range(count):
        writer.write(sample(path=f"/w{worker}/{i}/" + "x" * (i % 700), bytes_in=worker))
    writer.close()


def test_lines_never_interleave_across_processes(tmp_path):
    path = tmp_path / "traffic.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(path), w, 400)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = read_lines(path)  # every line parses: none broken or interleaved
    assert len(records) == 6 * 400
    for worker in range(6):
        mine = [int(r["path"].split("/")[2]) for r in records if r["bytes_in"] == worker]
        assert mine == list(range(400))


def test_read_lines_of_empty_file(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text("")
    assert read_lines(tmp_path / "t.jsonl") == []
