"""The hot-path shortcuts give exactly what the plain code gave.

Each reference below is the code as it was before the shortcut; the property
tests compare them on generated inputs biased towards the shortcuts' edges.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import trafficlog
from runtime.core import hosts as core_hosts
from runtime.core import paths as core_paths
from runtime.core import policy
from runtime.core import record as log_record
from runtime.core.hosts import HostError, normalize_host
from runtime.core.paths import normalize_path

# --------------------------------------------------------------------------- references


def ref_normalize_path(raw: str) -> str:
    path = core_paths.normalize_path_escapes(raw.split("#", 1)[0].split("?", 1)[0])

    def dot(segment: str, dots: str) -> bool:
        return segment.split(";", 1)[0] == dots

    last = path.rsplit("/", 1)[-1]
    trailing = path.endswith("/") or dot(last, ".") or dot(last, "..")
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "" or dot(segment, "."):
            continue
        if dot(segment, ".."):
            if out:
                out.pop()
            continue
        out.append(segment)
    normalized = "/" + "/".join(out)
    if trailing and out:
        normalized += "/"
    return normalized


def ref_ip_literal(text: str) -> str | None:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def ref_format_ts(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------- properties

PATH_ALPHABET = st.sampled_from([*"ab/.;%2fFcC5\\?#~-_é", "%2e", "%2E", "..", "//", "%25", "%5c"])
paths = st.lists(PATH_ALPHABET, max_size=24).map("".join)


@settings(max_examples=3000, deadline=None)
@given(paths)
def test_normalize_path_same_as_reference(raw: str) -> None:
    assert normalize_path(raw) == ref_normalize_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/",
        "/a",
        "/a/",
        "/a/b/c",
        "/a/b/?q=1",
        "/a/./b",
        "/a/../b",
        "/a//b",
        "//a",
        "/a/.",
        "/a/..",
        "/.hidden",
        "/a/.;x/b",
        "/a/..;x",
        "a/b",
        "",
        "*",
        "/%41",
        "/a%2fb",
        "/a;x/b",
        "/é/ü/",
    ],
)
def test_normalize_path_edges(raw: str) -> None:
    assert normalize_path(raw) == ref_normalize_path(raw)


HOST_ALPHABET = st.sampled_from([*"0123456789.:abcdefABCDEF%[]xyz- _", "::", "\u0661"])
hosts = st.lists(HOST_ALPHABET, max_size=40).map("".join)


@settings(max_examples=3000, deadline=None)
@given(hosts)
def test_ip_literal_same_as_reference(text: str) -> None:
    assert core_hosts.ip_literal(text) == ref_ip_literal(text)


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4",
        "01.2.3.4",
        "1.2.3",
        "256.1.1.1",
        "::1",
        "[::1]",
        "fe80::1%eth0",
        "[2001:db8::1]",
        "1.2.3.4.",
        "example.com",
        "1e1.2.3.4",
        "0x7f.0.0.1",
        "2130706433",
        "",
        "[]",
        "::ffff:1.2.3.4",
    ],
)
def test_ip_literal_edges(text: str) -> None:
    assert core_hosts.ip_literal(text) == ref_ip_literal(text)


def test_normalize_host_cache_returns_the_same_and_raises_every_time() -> None:
    for _ in range(3):
        assert normalize_host("API.GitHub.com.") == "api.github.com"
        assert normalize_host("[::1]") == "::1"
        with pytest.raises(HostError):
            normalize_host("bad host")


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_format_ts_same_as_reference(epoch: float) -> None:
    assert log_record.format_ts(epoch) == ref_format_ts(epoch)


def test_format_ts_across_a_second_boundary() -> None:
    for epoch in (1795855303.9994, 1795855303.9995, 1795855303.9999996, 1795855304.0, 17958.5):
        assert log_record.format_ts(epoch) == ref_format_ts(epoch)


def test_encode_line_same_as_json_dumps() -> None:
    record = log_record.HttpRecord(
        phase=log_record.END,
        id="7d0c3a52-4f5e-4b8a-9a0e-2c1d3e4f5a6b",
        ts=log_record.format_ts(1795855303.25),
        action="ALLOW",
        violation=False,
        mode="enforce",
        reason="rule_match",
        rule="*.example.com",
        rule_source="/work/.copilot_here/network.json",
        method="GET",
        scheme="https",
        host="xn--bcher-kva.example.com",
        port=443,
        path="/caf\u00e9/\u2603",
        status=None,
        http_version="HTTP/2.0",
        duration_ms=float("inf"),
        bytes_out=0,
        bytes_in=12,
    )
    fields = log_record.HTTP_FIELDS
    expected = json.dumps({k: getattr(record, k) for k in fields}, separators=(",", ":"))
    assert trafficlog.encode_line(record) == expected.encode("ascii") + b"\n"


# --------------------------------------------------------------------------- path readings

READINGS_POLICY = policy.Policy.build(
    policy.Mode.ENFORCE,
    False,
    [policy.make_rule("h.test", ["/a/", "/b"], ["GET"])],
    "test",
)
READINGS_RULE = READINGS_POLICY.rules[0]


def ref_decide_path(raw: str, method: str = "GET") -> tuple[policy.Reason, str]:
    """decide() without its shortcut: every path goes through path_readings."""
    readings = core_paths.path_readings(raw)
    if all(READINGS_RULE.allows_path(r) for r in readings):
        reason = policy.Reason.RULE_MATCH if method == "GET" else policy.Reason.METHOD_NOT_ALLOWED
        return reason, readings[0]
    refused = next(r for r in readings if not READINGS_RULE.allows_path(r))
    return policy.Reason.PATH_NOT_ALLOWED, refused


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(["/a/", "/b", "/", "a"]), paths, st.sampled_from(["GET", "PUT"]))
def test_decide_shortcut_same_as_all_readings(head: str, tail: str, method: str) -> None:
    raw = head + tail
    d = READINGS_POLICY.decide(policy.Request(method, raw, sni="h.test"))
    assert (d.reason, d.path) == ref_decide_path(raw, method)


@settings(max_examples=3000, deadline=None)
@given(paths)
def test_first_reading_is_the_normalised_path(raw: str) -> None:
    readings = core_paths.path_readings(raw)
    assert readings[0] == normalize_path(raw)
    assert len(set(readings)) == len(readings)
