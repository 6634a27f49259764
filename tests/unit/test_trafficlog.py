"""The traffic log: schema in step with the records, timestamps, whole lines under concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.core.explain import REASON_TEXT
from runtime.core.policy import Reason
from runtime.core.record import (
    DNS_FIELDS,
    HTTP_FIELDS,
    SCHEMA_VERSION,
    DnsRecord,
    HttpRecord,
    format_ts,
    to_dict,
)
from runtime.trafficlog import TrafficLogWriter, encode_line, read_lines, schema_path


def sample(**over) -> dict:
    """A line's object, as written (see `record` for the dataclass)."""
    return to_dict(record(**over))


def record(**over) -> HttpRecord:
    values = dict(
        phase="end",
        id="0f5e4a6c-1d2b-4a8e-9c3f-7b6a5d4c3b2a",
        ts=format_ts(1795852800.1234),
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
    return HttpRecord(**values)


def dns_record(**over) -> DnsRecord:
    values = dict(
        ts=format_ts(1795852800.5),
        action="BLOCK",
        violation=False,
        mode="enforce",
        reason="host_not_allowed",
        rule=None,
        rule_source=None,
        host="c2vjcmv0.evil.test",
        qtype="A",
        transport="udp",
        rcode="NXDOMAIN",
        answers=0,
        duration_ms=0.25,
    )
    values.update(over)
    return DnsRecord(**values)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(schema_path().read_text())


@pytest.mark.parametrize(
    ("kind", "names", "make"),
    [("http", HTTP_FIELDS, record), ("dns", DNS_FIELDS, dns_record)],
)
def test_schema_and_records_name_the_same_fields(schema, kind, names, make):
    branch = schema["$defs"][kind]
    assert tuple(branch["required"]) == names
    assert set(branch["properties"]) == set(names)
    assert branch["additionalProperties"] is False
    assert branch["properties"]["kind"] == {"const": kind}
    assert branch["properties"]["v"] == {"const": SCHEMA_VERSION}
    assert schema["properties"]["v"]["const"] == SCHEMA_VERSION
    line = to_dict(make())
    assert tuple(line) == names and names[:2] == ("kind", "v")
    assert line["v"] == 1
    assert (line["kind"], line["v"]) == (kind, SCHEMA_VERSION)
    jsonschema.validate(line, schema)


def test_each_kind_is_held_to_its_own_fields(schema):
    http_line, dns_line = sample(), to_dict(dns_record())
    for line, other in ((http_line, dns_line), (dns_line, http_line)):
        for kind in ("http", "dns", "other"):
            if kind == line["kind"]:
                continue
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate({**line, "kind": kind}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**line, **{k: other[k] for k in other if k not in line}}, schema)
    for bad in ({"v": 2}, {"v": None}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**http_line, **bad}, schema)
    without_version = dict(dns_line)
    del without_version["v"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(without_version, schema)


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


START = dict(phase="start", status=None, duration_ms=None, bytes_out=None, bytes_in=None)


def test_start_line_has_the_request_but_no_outcome(schema):
    jsonschema.validate(sample(**START), schema)
    jsonschema.validate(sample(**START, action="BLOCK", reason="path_not_allowed"), schema)
    assert sample(**START)["duration_ms"] is None


@pytest.mark.parametrize(
    "bad",
    [
        {"status": 200},  # the outcome is the end line's
        {"duration_ms": 1.0},
        {"bytes_out": 0},
        {"bytes_in": 0},
        {"method": None, "path": None, "http_version": None, "reason": "not_http"},
    ],
)
def test_schema_rejects_start_lines_with_an_outcome(schema, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**sample(**START), **bad}, schema)


@pytest.mark.parametrize(
    "bad",
    [
        {"phase": "middle"},
        {"id": ""},
        {"duration_ms": None},  # an end line has its outcome
        {"bytes_in": None},
        {"reason": "log_unavailable", "action": "ALLOW"},  # always a block
        {"reason": "log_unavailable", "violation": True},
    ],
)
def test_schema_rejects_bad_end_lines(schema, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**sample(), **bad}, schema)


def test_every_reason_is_in_the_schema_and_explained(schema):
    assert set(schema["$defs"]["http"]["properties"]["reason"]["enum"]) == {r.value for r in Reason}
    assert set(REASON_TEXT) == set(Reason)


def test_log_unavailable_is_a_valid_refusal(schema):
    line = sample(action="BLOCK", reason="log_unavailable", status=503, rule=None)
    jsonschema.validate(line, schema)


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
    line = encode_line(record(host="xn--bcher-kva.example"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == sample(host="xn--bcher-kva.example")
    assert b": " not in line
    dns = encode_line(dns_record())
    assert json.loads(dns) == to_dict(dns_record()) and dns.startswith(b'{"kind":"dns","v":1,')


def test_writer_appends_creates_0644_and_reopens_replaced_file(tmp_path):
    path = tmp_path / "traffic.jsonl"
    writer = TrafficLogWriter(path, recheck_seconds=0)
    assert not path.exists()  # lazily opened
    assert writer.write(record())
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644 & ~umask
    path.rename(tmp_path / "rotated.jsonl")
    assert writer.write(record(status=404))
    assert [r["status"] for r in read_lines(path)] == [404]
    assert [r["status"] for r in read_lines(tmp_path / "rotated.jsonl")] == [200]
    writer.close()


def test_write_failure_is_reported_not_raised(tmp_path):
    writer = TrafficLogWriter(tmp_path / "missing-dir" / "traffic.jsonl")
    assert writer.write(record()) is False


def _hammer(path: str, worker: int, count: int) -> None:
    writer = TrafficLogWriter(path)
    for i in range(count):
        writer.write(record(path=f"/w{worker}/{i}/" + "x" * (i % 700), bytes_in=worker))
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


def _fill_up(path: str, take_back_fails: bool, results: Any) -> None:
    """In a child: a file size limit (RLIMIT_FSIZE) makes write() short, as a full disk does."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if take_back_fails:

        def refuse(fd: int, length: int) -> None:
            raise PermissionError("ftruncate refused")

        os.ftruncate = refuse  # this child only
    writer = TrafficLogWriter(path)
    first = writer.write(record(path="/first"))
    size = os.path.getsize(path)
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    second = writer.write(record(path="/second"))  # about 400 bytes, 100 fit
    third = writer.write(record(path="/third"))  # the limit is reached: nothing fits
    after = os.path.getsize(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    fourth = writer.write(record(path="/fourth"))  # space again
    writer.close()
    results.send((first, second, third, fourth, size, after))


@pytest.mark.parametrize("take_back_fails", [False, True])
def test_a_short_write_never_breaks_the_next_line(tmp_path: Path, take_back_fails: bool):
    path = tmp_path / "traffic.jsonl"
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_fill_up, args=(str(path), take_back_fails, send))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    first, second, third, fourth, size, after = receive.recv()
    assert (first, second, third, fourth) == (True, False, False, True)
    text = path.read_text()
    if not take_back_fails:
        # The partial line was cut off again: the file is whole lines only.
        assert after == size
        assert [r["path"] for r in read_lines(path)] == ["/first", "/fourth"]
    else:
        # It could not be: it stays a fragment of its own, the next line starts clean.
        first_line, fragment, last = text.splitlines()
        assert json.loads(first_line)["path"] == "/first"
        assert json.loads(last)["path"] == "/fourth"
        assert len(fragment) == 100 and not fragment.endswith("}")
    assert text.endswith("\n")


def test_a_file_ending_in_a_fragment_gets_a_newline_first(tmp_path: Path):
    path = tmp_path / "traffic.jsonl"
    path.write_bytes(encode_line(record(path="/old")) + b'{"kind":"http","v":1,"pha')
    writer = TrafficLogWriter(path)
    assert writer.write(record(path="/new"))
    assert writer.write(record(path="/newer"))
    writer.close()
    old, fragment, new, newer = path.read_text().splitlines()
    assert fragment == '{"kind":"http","v":1,"pha'
    assert [json.loads(x)["path"] for x in (old, new, newer)] == ["/old", "/new", "/newer"]


def test_read_lines_of_empty_file(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text("")
    assert read_lines(tmp_path / "t.jsonl") == []


def test_readme_examples_are_valid_lines(schema):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Traffic log schema", 1)[1].split("\n## ", 1)[0]
    examples = [line for line in section.splitlines() if line.startswith('{"kind":')]
    assert {json.loads(line)["kind"] for line in examples} == {"http", "dns"}
    for line in examples:
        jsonschema.validate(json.loads(line), schema)
