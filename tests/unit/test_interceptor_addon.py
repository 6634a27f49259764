"""The interceptor addons under mitmproxy's own test context (taddons + tflow)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
from mitmproxy import connection, exceptions, http
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer, modes
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from runtime.container import interceptor
from runtime.container.interceptor import main as interceptor_main
from runtime.container.interceptor.gate import (
    DECISION_HEADER,
    PolicyGate,
    verdict_of,
)
from runtime.container.interceptor.httponly import (
    MAX_REQUEST_LINE,
    Closed,
    HttpOnly,
    UpgradeGuard,
    starts_like_http,
)
from runtime.container.interceptor.logger import TrafficLogger
from runtime.container.interceptor.policystore import NO_POLICY, PolicyStore
from runtime.container.interceptor.readiness import Readiness
from runtime.container.interceptor.upstream import UpstreamPinning
from runtime.core.explain import explain
from runtime.core.policy import Mode, Origin, Policy, make_rule
from runtime.core.record import HTTP_FIELDS
from runtime.policyfile import write_policy
from runtime.trafficlog import read_lines, schema_path

CONFIG = "/work/.copilot_here/network.json"
USER = Origin("user", CONFIG)
DIALLED = "198.18.7.7"
#: What the tests' resolver answers (no test asks a real resolver).
RESOLVED = {
    "api.github.com": ["198.18.100.1"],
    "npm.registry.test": ["198.18.100.2", "2001:db8::2"],
    "evil.test": ["198.18.100.66"],
}


async def resolve(host: str, port: int) -> list[str]:
    if host in RESOLVED:
        return RESOLVED[host]
    if host[:1].isdigit() or ":" in host:
        return [host]  # an IP literal resolves to itself
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def drive(result: Any) -> None:
    """Run an async hook to its end: with the resolver above it never has to wait."""
    if not inspect.iscoroutine(result):
        return
    try:
        result.send(None)
    except StopIteration:
        return
    raise AssertionError("the hook waited for something")


def policy(mode: Mode = Mode.ENFORCE, log: bool = True, *rules) -> Policy:
    rules = rules or (
        make_rule("api.github.com", ["/repos/"], origin=USER),
        make_rule("npm.registry.test"),
        make_rule("198.18.9.9"),
    )
    return Policy.build(mode, log, rules, CONFIG)


def make_flow(
    url: str,
    *,
    sni: str | None = "api.github.com",
    host: str | None = None,
    method: str = "GET",
    dialled: str = DIALLED,
    http2: bool = False,
    body: bytes = b"",
) -> http.HTTPFlow:
    """A flow as transparent mode hands it to addons: request.host is the dialled IP."""
    req = http.Request.make(method, url, body)
    port = req.port
    if http2:
        req.http_version = "HTTP/2.0"
        req.authority = host or req.host
        req.headers.pop("Host", None)
    else:
        req.headers["Host"] = host or req.host
    req.data.host = dialled
    client = tflow.tclient_conn()
    client.sni = sni
    client.proxy_mode = ProxyMode.parse("transparent")
    client.sockname = (dialled, port)
    flow = tflow.tflow(client_conn=client, req=req)
    return flow


@pytest.fixture
def tmp_log(tmp_path: Path) -> Path:
    return tmp_path / "traffic.jsonl"


@pytest.fixture
def addons(tmp_log: Path):
    store = PolicyStore(policy())
    gate = PolicyGate(store)
    pin = UpstreamPinning(resolve=resolve)
    log = TrafficLogger()
    with taddons.context(store, gate, pin, log) as tctx:
        tctx.configure(log, secure_proxy_traffic_log=str(tmp_log))
        yield tctx, gate, pin, log, store


def run(addons, flow: http.HTTPFlow, status: int = 200, body: bytes = b"hello") -> None:
    """Drive the hooks in the order mitmproxy calls them for one request."""
    _tctx, gate, pin, log, _ = addons
    gate.requestheaders(flow)
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    if flow.response is None:  # goes upstream: the response arrives, streamed
        if callable(flow.request.stream):
            flow.request.stream(flow.request.raw_content or b"")
            flow.request.data.content = None
        flow.response = http.Response.make(status, b"", {"Content-Length": str(len(body))})
        log.responseheaders(flow)
        assert callable(flow.response.stream)
        flow.response.stream(body)
        flow.response.data.content = None
    else:
        log.responseheaders(flow)
    log.response(flow)


def all_lines(path: Path) -> list[dict]:
    return read_lines(path) if path.exists() else []


def lines(path: Path) -> list[dict]:
    """The end lines: one per request (and per connection closed as not HTTP)."""
    return [line for line in all_lines(path) if line["phase"] == "end"]


def validate(record: dict) -> None:
    schema = json.loads(schema_path().read_text())
    jsonschema.validate(record, schema)


# --------------------------------------------------------------------------- blocking


def test_blocked_request_gets_403_with_explanation(addons, tmp_log):
    flow = make_flow("https://evil.test/upload?token=s3cret", sni="evil.test")
    run(addons, flow)
    resp = flow.response
    assert resp.status_code == 403
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.headers[DECISION_HEADER] == "block; reason=host_not_allowed"
    assert int(resp.headers["Content-Length"]) == len(resp.raw_content)
    text = resp.text
    assert text == explain(verdict_of(flow).decision, "GET", "https://evil.test/upload", CONFIG)
    assert text.startswith("BLOCKED: GET https://evil.test/upload\n")
    assert "reason: host_not_allowed" in text
    assert 'fix: add this rule to "allowed_rules" in ' + CONFIG in text
    assert '{"host": "evil.test", "allowed_paths": ["/upload"]}' in text
    assert CONFIG in text
    assert "s3cret" not in text
    # Blocked: not pinned upstream, not streamed.
    assert flow.request.host == DIALLED
    assert not flow.request.stream
    [line] = lines(tmp_log)
    assert line["action"] == "BLOCK" and line["status"] == 403 and not line["violation"]
    assert line["reason"] == "host_not_allowed" and line["rule"] is None
    validate(line)


def test_path_not_allowed_names_the_rule_and_its_source(addons, tmp_log):
    flow = make_flow("https://api.github.com/repos/../admin", method="POST")
    run(addons, flow)
    assert flow.response.status_code == 403
    assert flow.response.headers[DECISION_HEADER] == "block; reason=path_not_allowed"
    assert "BLOCKED: POST https://api.github.com/admin" in flow.response.text
    [line] = lines(tmp_log)
    assert line["path"] == "/admin"
    assert line["rule"] == "api.github.com" and line["rule_source"] == CONFIG


def test_allowed_request_is_pinned_to_the_judged_name(addons, tmp_log):
    flow = make_flow("https://api.github.com/repos/a/b?per_page=100&access_token=XYZ")
    run(addons, flow, body=b"x" * 1234)
    assert flow.response.status_code == 200
    # The judged name's address, resolved by the proxy: not the dialled IP.
    assert flow.request.host == "198.18.100.1" == verdict_of(flow).address
    assert flow.request.port == 443
    assert flow.request.headers["Host"] == "api.github.com"
    [line] = lines(tmp_log)
    validate(line)
    assert list(line) == list(HTTP_FIELDS)
    assert line["action"] == "ALLOW" and line["reason"] == "rule_match"
    assert line["path"] == "/repos/a/b" and line["bytes_in"] == 1234
    assert line["host"] == "api.github.com" and line["port"] == 443
    raw = tmp_log.read_text()
    assert "per_page" not in raw and "XYZ" not in raw and "?" not in raw


def test_ip_literal_reached_only_as_the_judged_host(addons, tmp_log):
    flow = make_flow("http://198.18.9.9/x", sni=None, host="198.18.9.9", dialled="198.18.9.9")
    run(addons, flow)
    assert flow.response.status_code == 200
    assert flow.request.host == "198.18.9.9"
    flow = make_flow("http://198.18.8.8/x", sni=None, host="198.18.8.8", dialled="198.18.8.8")
    run(addons, flow)
    assert flow.response.status_code == 403


def test_dialled_ip_is_ignored_in_favour_of_the_name(addons):
    flow = make_flow("https://npm.registry.test/react", sni="npm.registry.test", dialled="1.2.3.4")
    run(addons, flow)
    assert flow.request.host == "198.18.100.2"  # the name's first address


def test_plain_http_uses_host_header(addons, tmp_log):
    flow = make_flow("http://npm.registry.test/x", sni=None, host="NPM.Registry.TEST:80")
    run(addons, flow)
    assert flow.response.status_code == 200
    assert flow.request.host == "198.18.100.2"
    assert lines(tmp_log)[0]["scheme"] == "http"


def test_host_mismatch_is_blocked(addons, tmp_log):
    flow = make_flow("https://evil.test/repos/x", sni="api.github.com", host="evil.test")
    run(addons, flow)
    assert flow.response.status_code == 403
    assert flow.response.headers[DECISION_HEADER] == "block; reason=host_mismatch"
    assert lines(tmp_log)[0]["reason"] == "host_mismatch"


def test_http2_authority_is_the_host_header(addons):
    flow = make_flow("https://evil.test/repos/x", sni="api.github.com", http2=True)
    run(addons, flow)
    assert flow.response.headers[DECISION_HEADER] == "block; reason=host_mismatch"
    flow = make_flow("https://api.github.com/repos/x", http2=True)
    run(addons, flow)
    assert flow.response.status_code == 200


def test_keep_alive_second_request_is_judged_on_its_own(addons, tmp_log):
    client = make_flow("https://api.github.com/repos/x").client_conn
    first = make_flow("https://api.github.com/repos/x")
    second = make_flow("https://api.github.com/admin")
    first.client_conn = second.client_conn = client
    run(addons, first)
    run(addons, second)
    assert first.response.status_code == 200
    assert second.response.status_code == 403
    assert [line["status"] for line in lines(tmp_log)] == [200, 403]


# --------------------------------------------------------------------------- modes


def test_monitor_lets_violations_through_and_logs_them(addons, tmp_log):
    _tctx, gate, *_ = addons
    gate.store.policy = policy(Mode.MONITOR, False)
    flow = make_flow("https://evil.test/x", sni="evil.test")
    run(addons, flow)
    assert flow.response.status_code == 200
    assert flow.request.host == "198.18.100.66"
    [line] = lines(tmp_log)
    assert line["action"] == "ALLOW" and line["violation"] is True
    assert line["mode"] == "monitor" and line["reason"] == "host_not_allowed"
    validate(line)


@pytest.mark.parametrize("log_to_file", [False, True])
def test_allow_all_logs_only_with_log_to_file(addons, tmp_log, log_to_file):
    _tctx, gate, *_ = addons
    gate.store.policy = Policy.build(Mode.ALLOW_ALL, log_to_file, (), "built-in defaults")
    flow = make_flow("https://evil.test/x", sni="evil.test")
    run(addons, flow)
    assert flow.response.status_code == 200
    got = lines(tmp_log)
    assert len(got) == (1 if log_to_file else 0)
    if got:
        assert got[0]["reason"] == "allow_all" and got[0]["mode"] == "allow-all"


def test_no_policy_fails_closed():
    gate = PolicyGate(PolicyStore())
    flow = make_flow("https://api.github.com/repos/x")
    gate.requestheaders(flow)
    assert flow.response.status_code == 403


# --------------------------------------------------------------------------- logging


def test_upstream_error_is_logged_once_as_502(addons, tmp_log):
    _tctx, gate, pin, log, _ = addons
    flow = make_flow("https://api.github.com/repos/x")
    gate.requestheaders(flow)
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    flow.error = tflow.terr("Connection refused")
    log.error(flow)
    log.error(flow)
    [line] = lines(tmp_log)
    assert line["status"] == 502 and line["action"] == "ALLOW"
    validate(line)


def test_client_gone_is_logged_with_null_status(addons, tmp_log):
    _tctx, gate, _pin, log, _ = addons
    flow = make_flow("https://api.github.com/repos/x")
    gate.requestheaders(flow)
    flow.error = tflow.terr("Client disconnected.")
    log.error(flow)
    [line] = lines(tmp_log)
    assert line["status"] is None
    validate(line)


def test_blocked_large_body_is_killed_and_logged_without_status(addons, tmp_log):
    _tctx, gate, pin, log, _ = addons
    flow = make_flow("https://evil.test/upload", sni="evil.test", method="POST")
    flow.request.headers["Content-Length"] = str(5 * 1024 * 1024)
    gate.requestheaders(flow)
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    assert flow.response is None and flow.error.msg == flow.error.KILLED_MESSAGE
    assert flow.request.host == DIALLED  # never pinned upstream
    log.error(flow)
    [line] = lines(tmp_log)
    assert line["action"] == "BLOCK" and line["status"] is None


def test_unsent_403_is_not_logged_as_received(addons, tmp_log):
    _tctx, gate, _pin, log, _ = addons
    flow = make_flow("https://evil.test/x", sni="evil.test", method="POST", body=b"abc")
    gate.requestheaders(flow)
    assert flow.response.status_code == 403
    flow.error = tflow.terr("Client disconnected.")
    log.error(flow)
    assert lines(tmp_log)[0]["status"] is None


def test_response_then_error_logs_once(addons, tmp_log):
    _tctx, _gate, _pin, log, _ = addons
    flow = make_flow("https://api.github.com/repos/x")
    run(addons, flow)
    flow.error = tflow.terr("late")
    log.error(flow)
    assert len(lines(tmp_log)) == 1


def test_request_body_bytes_counted_when_streamed(addons, tmp_log):
    flow = make_flow("https://api.github.com/repos/x", method="POST", body=b"a" * 777)
    run(addons, flow)
    assert lines(tmp_log)[0]["bytes_out"] == 777


def test_start_line_is_written_before_the_request_goes_on(addons, tmp_log):
    _tctx, gate, pin, log, _ = addons
    flow = make_flow("https://api.github.com/repos/x?token=s3cret", method="PUT")
    gate.requestheaders(flow)
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    # Nothing has been forwarded yet, and the request is in the log already.
    [start] = all_lines(tmp_log)
    validate(start)
    assert (start["phase"], start["id"], start["method"]) == ("start", flow.id, "PUT")
    assert (start["host"], start["path"], start["action"]) == (
        "api.github.com",
        "/repos/x",
        "ALLOW",
    )
    assert start["status"] is start["duration_ms"] is start["bytes_in"] is None
    flow.response = http.Response.make(204, b"")
    log.responseheaders(flow)
    log.response(flow)
    first, end = all_lines(tmp_log)
    assert first == start
    assert (end["phase"], end["id"], end["status"]) == ("end", flow.id, 204)
    validate(end)


@pytest.mark.parametrize(("mode", "log_to_file"), [(Mode.ENFORCE, True), (Mode.MONITOR, False)])
def test_unwritable_log_refuses_requests_with_503_until_it_works(
    addons, tmp_path, mode, log_to_file
):
    """The policy logs every request and the log cannot be written: nothing goes out."""
    tctx, _gate, _pin, log, store = addons
    store.policy = policy(mode, log_to_file)
    missing = tmp_path / "gone" / "traffic.jsonl"
    tctx.configure(log, secure_proxy_traffic_log=str(missing))
    flow = make_flow("https://api.github.com/repos/x")
    run(addons, flow)
    assert flow.response.status_code == 503
    assert flow.response.headers[DECISION_HEADER] == "block; reason=log_unavailable"
    assert flow.response.headers["Retry-After"] == "5"
    text = flow.response.text
    assert text.startswith("BLOCKED: GET https://api.github.com/repos/x\n")
    assert "reason: log_unavailable" in text and "fix: free space" in text
    assert flow.request.stream is False  # the upstream connection is never opened
    # A request the policy blocks anyway keeps its own answer.
    blocked = make_flow("https://evil.test/x", sni="evil.test")
    run(addons, blocked)
    assert blocked.response.status_code == (403 if mode is Mode.ENFORCE else 503)
    # Writable again: the next request goes through, logged.
    missing.parent.mkdir()
    flow = make_flow("https://api.github.com/repos/y")
    run(addons, flow)
    assert flow.response.status_code == 200
    assert [(x["phase"], x["path"]) for x in all_lines(missing)] == [
        ("start", "/repos/y"),
        ("end", "/repos/y"),
    ]


def test_unwritable_log_refuses_a_large_upload_without_forwarding_it(addons, tmp_path):
    tctx, gate, pin, log, _ = addons
    tctx.configure(log, secure_proxy_traffic_log=str(tmp_path / "gone" / "t.jsonl"))
    flow = make_flow("https://api.github.com/repos/upload", method="POST")
    flow.request.headers["Content-Length"] = str(5 * 1024 * 1024)
    gate.requestheaders(flow)
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    # No block sink in this test: the connection is closed, nothing is sent.
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    assert verdict_of(flow).decision.reason.value == "log_unavailable"


def test_allow_all_without_a_log_never_refuses(addons, tmp_path):
    tctx, _gate, _pin, log, store = addons
    store.policy = Policy.build(Mode.ALLOW_ALL, False, (), "built-in defaults")
    tctx.configure(log, secure_proxy_traffic_log=str(tmp_path / "gone" / "t.jsonl"))
    flow = make_flow("https://evil.test/x", sni="evil.test")
    run(addons, flow)
    assert flow.response.status_code == 200


def test_a_request_the_gate_never_judged_is_not_forwarded(addons):
    """An addon error in the gate leaves no verdict: the request is closed, not sent on."""
    _tctx, _gate, pin, log, _ = addons
    flow = make_flow("https://evil.test/x", sni="evil.test")
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    assert flow.request.host == DIALLED


def test_websocket_upgrade_is_judged_and_logged(addons, tmp_log):
    flow = make_flow("https://evil.test/socket", sni="evil.test")
    flow.request.headers["Upgrade"] = "websocket"
    flow.request.headers["Connection"] = "Upgrade"
    run(addons, flow)
    assert flow.response.status_code == 403
    flow = make_flow("https://api.github.com/repos/socket")
    flow.request.headers["Upgrade"] = "websocket"
    run(addons, flow, status=101, body=b"")
    assert [line["status"] for line in lines(tmp_log)] == [403, 101]


# --------------------------------------------------------------------------- reload


def test_sighup_reload_swaps_policy_for_the_next_request(addons, tmp_path):
    tctx, _gate, _pin, _log, store = addons
    policy_file = tmp_path / "policy.json"
    write_policy(policy(), policy_file)
    tctx.configure(store, secure_proxy_policy=str(policy_file))
    client = make_flow("https://evil.test/", sni="evil.test").client_conn

    def request() -> int:
        flow = make_flow("https://evil.test/x", sni="evil.test")
        flow.client_conn = client
        run(addons, flow)
        return flow.response.status_code

    assert request() == 403
    write_policy(policy(Mode.ENFORCE, True, make_rule("evil.test")), policy_file)
    old = store.policy
    assert store.reload() is True
    assert store.policy is not old
    assert request() == 200

    # Broken and missing files keep the policy in force.
    current = store.policy
    policy_file.write_text("{ not json")
    assert store.reload() is False
    assert store.policy is current
    policy_file.write_text(json.dumps({"version": 99}))
    assert store.reload() is False
    policy_file.unlink()
    assert store.reload() is False
    assert store.policy is current
    assert request() == 200


@pytest.mark.parametrize("content", [None, "{ not json", '{"version": 99}'])
def test_policy_option_that_cannot_be_loaded_is_an_options_error(tmp_path, content):
    """The option loads the policy at once: a missing or broken file refuses the option
    (mitmproxy then does not start), and nothing is allowed meanwhile."""
    policy_file = tmp_path / "policy.json"
    if content is not None:
        policy_file.write_text(content)
    store = PolicyStore()
    with taddons.context(store) as tctx:
        with pytest.raises(exceptions.OptionsError, match=str(policy_file)):
            tctx.configure(store, secure_proxy_policy=str(policy_file))
        assert store.policy is NO_POLICY
        write_policy(policy(Mode.MONITOR, True), policy_file)
        tctx.configure(store, secure_proxy_policy=str(policy_file))
        assert store.policy.mode is Mode.MONITOR


def test_sighup_handler_installed_on_running_loop(tmp_path):
    store = PolicyStore()
    policy_file = tmp_path / "policy.json"
    write_policy(policy(), policy_file)

    async def scenario() -> Mode:
        with taddons.context(store) as tctx:
            tctx.configure(store, secure_proxy_policy=str(policy_file))
            assert store.policy.mode is Mode.ENFORCE
            write_policy(policy(Mode.MONITOR, True), policy_file)
            store.running()
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                for _ in range(200):
                    if store.policy.mode is Mode.MONITOR:
                        break
                    await asyncio.sleep(0.01)
                return store.policy.mode
            finally:
                store.done()

    assert asyncio.run(scenario()) is Mode.MONITOR


# --------------------------------------------------------------------------- readiness


def test_readiness_publishes_ca_then_marker(tmp_path):
    confdir = tmp_path / "confdir"
    confdir.mkdir()
    (confdir / "mitmproxy-ca-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nx\n")
    marker = tmp_path / "run" / "interceptor.ready"
    marker.parent.mkdir()
    marker.write_text("stale")
    ca = tmp_path / "ca" / "certs" / "ca.pem"
    ready = Readiness()
    with taddons.context(ready) as tctx:
        tctx.configure(
            ready,
            confdir=str(confdir),
            secure_proxy_ca_cert=str(ca),
            secure_proxy_ready_marker=str(marker),
        )
        assert not marker.exists()  # stale marker removed at start
        ready.running()
        assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
        assert ca.stat().st_mode & 0o777 == 0o644
        assert json.loads(marker.read_text())["pid"] == os.getpid()
        ready.done()
        assert not marker.exists()


def test_upstream_bundle_combines_system_store_and_extra(tmp_path):
    system = tmp_path / "system.pem"
    system.write_text("SYSTEM\n")
    extra = tmp_path / "extra.pem"
    extra.write_text("EXTRA")
    bundle = interceptor_main.build_upstream_bundle(tmp_path, str(extra), system)
    assert bundle.read_text() == "SYSTEM\nEXTRA\n"
    with pytest.raises(FileNotFoundError):
        interceptor_main.build_upstream_bundle(tmp_path, str(tmp_path / "nope"), system)


def test_command_line_sets_the_declared_options(tmp_path, monkeypatch):
    monkeypatch.delenv("SECURE_PROXY_UPSTREAM_CA", raising=False)
    monkeypatch.setenv("SECURE_PROXY_MITM_VERBOSITY", "error")
    extra = tmp_path / "extra.pem"
    extra.write_text("EXTRA\n")
    argv = [
        *("--confdir", str(tmp_path / "confdir"), "--policy", str(tmp_path / "p.json")),
        *("--traffic-log", str(tmp_path / "t.jsonl"), "--ca-cert", str(tmp_path / "ca.pem")),
        *("--ready-marker", str(tmp_path / "ready"), "--upstream-ca", str(extra)),
    ]

    async def scenario() -> dict[str, Any]:
        master = interceptor_main.make_master()
        args = interceptor_main.parse_args(master.options, argv)
        return interceptor_main.mitmproxy_options(args)

    opts = asyncio.run(scenario())
    assert opts["mode"] == ["transparent@127.0.0.1:58080", "transparent@::1:58080"]
    assert opts["listen_port"] == 58080 and opts["termlog_verbosity"] == "error"
    assert opts["confdir"] == str(tmp_path / "confdir")
    assert (tmp_path / "confdir").stat().st_mode & 0o777 == 0o700
    assert opts["secure_proxy_policy"] == str(tmp_path / "p.json")
    assert opts["secure_proxy_traffic_log"] == str(tmp_path / "t.jsonl")
    assert opts["secure_proxy_ca_cert"] == str(tmp_path / "ca.pem")
    assert opts["secure_proxy_ready_marker"] == str(tmp_path / "ready")
    bundle = Path(opts["ssl_verify_upstream_trusted_ca"])
    assert bundle.parent == tmp_path / "confdir" and bundle.read_text().endswith("EXTRA\n")
    assert opts["connection_strategy"] == "lazy" and opts["stream_large_bodies"] == "1m"
    # Nothing is ever relayed unjudged: no raw TCP, no pass-through hosts.
    assert opts["rawtcp"] is False and opts["websocket"] is True
    assert opts["tcp_hosts"] == opts["udp_hosts"] == []
    assert opts["ignore_hosts"] == opts["allow_hosts"] == []


def test_interceptor_does_not_start_without_its_policy(tmp_path):
    """`python -m runtime.container.interceptor` with a policy that is not there: exit 2,
    the reason on stderr, nothing listening, no readiness marker."""
    missing = tmp_path / "run" / "policy.json"
    marker = tmp_path / "ready"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "runtime.container.interceptor"),
            *("--policy", str(missing), "--confdir", str(tmp_path / "confdir")),
            *("--ready-marker", str(marker), "--ca-cert", str(tmp_path / "ca.pem")),
            *("--traffic-log", str(tmp_path / "t.jsonl"), "--port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2, result.stderr
    assert f"cannot load the policy {missing}" in result.stderr
    assert "fail closed" in result.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- not HTTP


def _client_hello(sni: str) -> bytes:
    """A real TLS ClientHello, as a client's first bytes."""
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


@dataclass
class Conn:
    """One client connection in transparent mode, up to its next_layer decision."""

    context: Context
    nextlayer: layer.NextLayer
    commands: list[commands.Command]

    @property
    def chosen(self) -> layer.Layer | None:
        return self.nextlayer.layer


def connection_to(
    tctx: Any,
    dialled: tuple[str, int] = (DIALLED, 80),
    *,
    inside_tls: str | None = None,
    alpn: bytes | None = None,
    transport: str = "tcp",
) -> Conn:
    client = connection.Client(
        peername=("127.0.0.1", 40000),
        sockname=dialled,
        timestamp_start=time.time(),
        proxy_mode=ProxyMode.parse("transparent"),
        transport_protocol=transport,
    )
    context = Context(client, tctx.options)
    context.server.address = dialled
    modes.TransparentProxy(context)
    if inside_tls is not None:  # what the stack looks like once TLS with the client is up
        ServerTLSLayer(context)
        ClientTLSLayer(context)
        client.tls = True
        client.sni = inside_tls
        client.alpn = alpn
    nextlayer = layer.NextLayer(context)
    return Conn(context, nextlayer, list(nextlayer.handle_event(events.Start())))


def send(conn: Conn, data: bytes, hooks: Sequence[Any]) -> Conn:
    """Deliver bytes from the client; answer next_layer hooks as mitmproxy's master does
    (every addon in order), and keep what the chosen layer does with the bytes."""
    todo = list(conn.nextlayer.handle_event(events.DataReceived(conn.context.client, data)))
    while todo:
        cmd = todo.pop(0)
        if isinstance(cmd, layer.NextLayerHook):
            for hook in hooks:
                hook.next_layer(cmd.data)
            todo = list(conn.nextlayer.handle_event(events.HookCompleted(cmd))) + todo
        else:
            conn.commands.append(cmd)
    return conn


@pytest.fixture(params=[False, True], ids=["rawtcp-off", "rawtcp-on"])
def layers_ctx(request, tmp_log: Path):
    """mitmproxy's own NextLayer addon, then ours, as DumpMaster orders them. With
    rawtcp on too: HttpOnly must hold by itself."""
    gate = PolicyGate(PolicyStore(policy()))
    traffic = TrafficLogger()
    guard = HttpOnly(gate.store, traffic)
    mitm = NextLayer()
    # Proxyserver only for its options: the HTTP layer, once chosen, reads them.
    with taddons.context(Proxyserver(), mitm, guard, traffic) as tctx:
        tctx.configure(traffic, secure_proxy_traffic_log=str(tmp_log))
        tctx.configure(mitm, rawtcp=request.param)
        yield tctx, gate, [mitm, guard]


def closed_client(conn: Conn) -> bool:
    return any(
        isinstance(c, commands.CloseConnection) and c.connection is conn.context.client
        for c in conn.commands
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x02 binary\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\r\nGET /repos/x HTTP/1.1\r\nHost: api.github.com\r\n\r\n",  # one CRLF first
        b"\nGET / HTTP/1.1\r\n\r\n",
        b"HELO mail.example\r\n",  # mitmproxy guesses HTTP: no version in the line
        b"GET /x\r\n",  # HTTP/0.9
        b"GET / HTTP/1.1 trailing\r\n",
        b"G" * (MAX_REQUEST_LINE + 1),
    ],
)
def test_bytes_that_are_not_http_are_closed_and_logged(layers_ctx, tmp_log, data):
    _tctx, _gate, hooks = layers_ctx
    conn = send(connection_to(_tctx), data, hooks)
    assert isinstance(conn.chosen, Closed)
    assert closed_client(conn)
    assert not any(isinstance(c, commands.OpenConnection) for c in conn.commands)
    [line] = lines(tmp_log)
    validate(line)
    assert line["reason"] == "not_http" and line["action"] == "BLOCK"
    assert (line["scheme"], line["host"], line["port"]) == ("http", DIALLED, 80)
    assert line["method"] is None and line["path"] is None and line["status"] is None


def test_http_request_line_goes_to_the_http_layer(layers_ctx, tmp_log):
    _tctx, _gate, hooks = layers_ctx
    conn = send(connection_to(_tctx), b"GET /repos/x HTTP/1.1\r\nHost: api.github.com\r\n", hooks)
    assert isinstance(conn.chosen, HttpLayer)
    assert lines(tmp_log) == []


def test_partial_request_line_waits_for_more_bytes(layers_ctx, tmp_log):
    _tctx, _gate, hooks = layers_ctx
    conn = send(connection_to(_tctx), b"GE", hooks)
    assert conn.chosen is None and not closed_client(conn)
    send(conn, b"T /repos/x HT", hooks)
    assert conn.chosen is None
    # Layers built for a decision not taken are not left on the connection's stack.
    assert [type(x) for x in conn.context.layers] == [modes.TransparentProxy]
    send(conn, b"TP/1.1\r\nHost: api.github.com\r\n\r\n", hooks)
    assert isinstance(conn.chosen, HttpLayer)
    assert lines(tmp_log) == []


def test_partial_junk_is_closed_without_waiting(layers_ctx):
    _tctx, _gate, hooks = layers_ctx
    conn = send(connection_to(_tctx), b"GET /x \x00", hooks)
    assert isinstance(conn.chosen, Closed)


def test_tls_client_hello_is_terminated_here(layers_ctx, tmp_log):
    _tctx, _gate, hooks = layers_ctx
    conn = connection_to(_tctx, (DIALLED, 443))
    # Only the decision: the TLS layers would go on to ask for certificates.
    conn.nextlayer.events.append(events.DataReceived(conn.context.client, _client_hello("a.test")))
    for hook in hooks:
        hook.next_layer(conn.nextlayer)
    assert isinstance(conn.chosen, ServerTLSLayer)
    assert isinstance(conn.chosen.child_layer, ClientTLSLayer)
    assert lines(tmp_log) == []


@pytest.mark.parametrize("alpn", [None, b"http/1.1", b"h2"])
def test_not_http_inside_tls_is_closed_and_logged_with_the_sni(layers_ctx, tmp_log, alpn):
    _tctx, _gate, hooks = layers_ctx
    conn = connection_to(_tctx, (DIALLED, 443), inside_tls="Evil.Test", alpn=alpn)
    send(conn, b"\x00\x01junk that is not HTTP\n", hooks)
    assert isinstance(conn.chosen, Closed) and closed_client(conn)
    [line] = lines(tmp_log)
    assert (line["scheme"], line["host"], line["port"]) == ("https", "evil.test", 443)
    validate(line)


def test_http2_inside_tls_needs_the_connection_preface(layers_ctx):
    _tctx, _gate, hooks = layers_ctx
    conn = connection_to(_tctx, (DIALLED, 443), inside_tls="api.github.com", alpn=b"h2")
    send(conn, b"PRI * HTTP/2.0\r\n", hooks)
    assert conn.chosen is None
    send(conn, b"\r\nSM\r\n\r\n\x00\x00", hooks)
    assert isinstance(conn.chosen, HttpLayer)
    conn = connection_to(_tctx, (DIALLED, 443), inside_tls="api.github.com", alpn=b"h2")
    send(conn, b"GET / HTTP/1.1\r\n\r\n", hooks)  # h2 negotiated, HTTP/1 sent
    assert isinstance(conn.chosen, Closed)


def test_tls_inside_tls_is_closed(layers_ctx):
    _tctx, _gate, hooks = layers_ctx
    conn = connection_to(_tctx, (DIALLED, 443), inside_tls="api.github.com")
    send(conn, _client_hello("evil.test"), hooks)
    assert isinstance(conn.chosen, Closed)


@pytest.mark.parametrize(
    "options",
    [{"tcp_hosts": [".*"]}, {"ignore_hosts": [".*"]}, {"allow_hosts": ["^nothing$"]}],
)
def test_hosts_mitmproxy_would_pass_through_are_closed(layers_ctx, tmp_log, options):
    """tcp_hosts / ignore_hosts / allow_hosts make mitmproxy relay raw TCP: never here."""
    tctx, _gate, hooks = layers_ctx
    tctx.configure(hooks[0], **options)
    conn = send(connection_to(tctx), b"GET /repos/x HTTP/1.1\r\nHost: api.github.com\r\n", hooks)
    assert isinstance(conn.chosen, Closed)
    assert lines(tmp_log)[0]["reason"] == "not_http"


def test_dns_and_udp_layers_are_closed(layers_ctx):
    tctx, _gate, hooks = layers_ctx
    conn = send(connection_to(tctx, (DIALLED, 53)), b"\x00\x1c\x12\x34\x01\x00", hooks)
    assert isinstance(conn.chosen, Closed)
    conn = send(connection_to(tctx, (DIALLED, 443), transport="udp"), b"\x00" * 40, hooks)
    assert isinstance(conn.chosen, Closed)


@pytest.mark.parametrize(("mode", "log"), [(Mode.MONITOR, False), (Mode.ALLOW_ALL, True)])
def test_not_http_is_closed_in_monitor_and_allow_all_too(layers_ctx, tmp_log, mode, log):
    tctx, gate, hooks = layers_ctx
    gate.store.policy = Policy.build(mode, log, (), CONFIG)
    conn = send(connection_to(tctx, ("2001:db8::20", 80)), b"\x00\x01\x02\n", hooks)
    assert isinstance(conn.chosen, Closed)
    [line] = lines(tmp_log)
    assert line["mode"] == mode.value and line["host"] == "2001:db8::20"
    assert line["action"] == "BLOCK" and line["violation"] is False
    validate(line)


def test_allow_all_without_log_closes_silently(layers_ctx, tmp_log):
    tctx, gate, hooks = layers_ctx
    gate.store.policy = Policy.build(Mode.ALLOW_ALL, False, (), CONFIG)
    conn = send(connection_to(tctx), b"\x00\x01\x02\n", hooks)
    assert isinstance(conn.chosen, Closed)
    assert lines(tmp_log) == []


def test_closed_layer_closes_once_and_relays_nothing():
    context = Context(tflow.tclient_conn(), taddons.context().options)
    closed = Closed(context)
    first = list(closed.handle_event(events.Start()))
    assert [type(c) for c in first] == [commands.CloseConnection]
    assert first[0].connection is context.client
    later = list(closed.handle_event(events.DataReceived(context.client, b"more bytes")))
    assert later == []


def test_tls_passthrough_asked_by_an_addon_is_refused():
    guard = HttpOnly(PolicyStore(policy()))
    data = SimpleNamespace(ignore_connection=True)
    guard.tls_clienthello(data)
    assert data.ignore_connection is False


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"get /x HTTP/1.0\n", True),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n", True),
        (b"GET http://a.test/ HTTP/1.1\r\n", True),
        (b"G", None),
        (b"GET /a", None),
        (b"GET /a HTTP/1.", None),
        (b"GET /a HTTP/1.1\r", None),
        (b"\r\nGET / HTTP/1.1\r\n", False),
        (b" GET / HTTP/1.1\r\n", False),
        (b"GET  / HTTP/1.1\r\n", False),
        (b"GET /a HTTPS", False),
        (b"\x16\x03\x01", False),
    ],
)
def test_starts_like_http(data, expected):
    assert starts_like_http(data, h2=False) is expected


# --------------------------------------------------------------------------- upgrades


@pytest.fixture
def upgrades(tmp_log: Path):
    gate = PolicyGate(PolicyStore(policy()))
    guard = UpgradeGuard(gate)
    pin = UpstreamPinning(resolve=resolve)
    log = TrafficLogger()
    with taddons.context(guard, gate, pin, log) as tctx:
        tctx.configure(log, secure_proxy_traffic_log=str(tmp_log))
        yield tctx, guard, gate, pin, log


def upgrade_flow(protocol: str, url: str = "https://api.github.com/repos/x", **kw) -> http.HTTPFlow:
    flow = make_flow(url, **kw)
    flow.request.headers["Upgrade"] = protocol
    flow.request.headers["Connection"] = "Upgrade"
    return flow


def request_hooks(upgrades, flow: http.HTTPFlow) -> None:
    _tctx, guard, gate, pin, log = upgrades
    for addon in (guard, gate, pin, log):
        drive(addon.requestheaders(flow))


@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.MONITOR, Mode.ALLOW_ALL])
@pytest.mark.parametrize("protocol", ["x-tunnel", "websocket, x", "TLS/1.2", "h2c, x"])
def test_upgrade_to_another_protocol_gets_403_in_every_mode(upgrades, tmp_log, mode, protocol):
    _tctx, _guard, gate, _pin, log = upgrades
    gate.store.policy = policy(mode, True)
    flow = upgrade_flow(protocol)
    request_hooks(upgrades, flow)
    assert flow.response.status_code == 403
    assert flow.response.headers[DECISION_HEADER] == "block; reason=not_http"
    text = flow.response.text
    assert text.startswith("BLOCKED: GET https://api.github.com/repos/x\n")
    assert "reason: not_http" in text and "fix: none in the config" in text
    assert flow.request.host == DIALLED  # never pinned upstream
    log.response(flow)
    [line] = lines(tmp_log)
    assert line["reason"] == "not_http" and line["action"] == "BLOCK" and not line["violation"]
    assert line["mode"] == mode.value and line["status"] == 403 and line["path"] == "/repos/x"
    validate(line)


def test_upgrade_to_a_blocked_host_keeps_the_policy_reason(upgrades):
    flow = upgrade_flow("x-tunnel", "https://evil.test/x", sni="evil.test")
    request_hooks(upgrades, flow)
    assert flow.response.headers[DECISION_HEADER] == "block; reason=host_not_allowed"


def test_websocket_upgrade_is_left_to_the_policy(upgrades):
    flow = upgrade_flow("WebSocket")
    request_hooks(upgrades, flow)
    assert flow.response is None and flow.request.host == "198.18.100.1"
    assert flow.request.headers["Upgrade"] == "WebSocket"


def test_h2c_upgrade_headers_are_dropped(upgrades):
    flow = upgrade_flow("h2c", method="POST", body=b"hello")
    flow.request.headers["Connection"] = "keep-alive, Upgrade, HTTP2-Settings"
    flow.request.headers["HTTP2-Settings"] = "AAMAAABkAARAAAAAAAIAAAAA"
    request_hooks(upgrades, flow)
    assert flow.response is None  # judged on its own and sent on as HTTP/1.1
    assert "Upgrade" not in flow.request.headers
    assert "HTTP2-Settings" not in flow.request.headers
    assert flow.request.headers["Connection"] == "keep-alive"
    assert verdict_of(flow).decision.reason.value == "rule_match"


def response_101(flow: http.HTTPFlow, upgrade: str) -> None:
    flow.response = http.Response.make(101, b"", {"Upgrade": upgrade, "Connection": "Upgrade"})


@pytest.mark.parametrize(
    ("request_upgrade", "version", "response_upgrade"),
    [
        (None, None, "x-tunnel"),  # upstream switches without being asked
        ("websocket", "13", "x-tunnel"),  # asked for WebSocket, got something else
        ("websocket", None, "websocket"),  # mitmproxy would not frame this one
    ],
)
def test_101_that_is_not_a_websocket_is_killed(
    upgrades, tmp_log, request_upgrade, version, response_upgrade
):
    _tctx, guard, _gate, _pin, log = upgrades
    flow = make_flow("https://api.github.com/repos/x")
    if request_upgrade:
        flow.request.headers["Upgrade"] = request_upgrade
    if version:
        flow.request.headers["Sec-WebSocket-Version"] = version
    request_hooks(upgrades, flow)
    assert flow.response is None
    response_101(flow, response_upgrade)
    guard.responseheaders(flow)
    log.responseheaders(flow)
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    log.error(flow)
    [line] = lines(tmp_log)
    assert line["reason"] == "not_http" and line["action"] == "BLOCK"
    assert line["status"] is None and line["path"] == "/repos/x"
    validate(line)


def test_websocket_101_goes_through(upgrades, tmp_log):
    _tctx, guard, _gate, _pin, log = upgrades
    flow = upgrade_flow("websocket")
    flow.request.headers["Sec-WebSocket-Version"] = "13"
    request_hooks(upgrades, flow)
    response_101(flow, "websocket")
    guard.responseheaders(flow)
    log.responseheaders(flow)
    assert flow.error is None
    log.response(flow)
    assert lines(tmp_log)[0]["status"] == 101


def test_addon_order_puts_the_guards_first():
    names = [type(a).__name__ for a in interceptor.make_addons()]
    assert names.index("HttpOnly") < names.index("PolicyGate")
    assert names.index("UpgradeGuard") < names.index("PolicyGate")


def test_worker_n_listens_on_port_plus_n_with_its_own_marker(tmp_path, monkeypatch):
    monkeypatch.delenv("SECURE_PROXY_UPSTREAM_CA", raising=False)
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "run"))
    argv = ["--confdir", str(tmp_path / "confdir"), "--worker", "2"]

    async def scenario() -> dict[str, Any]:
        master = interceptor_main.make_master()
        return interceptor_main.mitmproxy_options(interceptor_main.parse_args(master.options, argv))

    opts = asyncio.run(scenario())
    assert opts["listen_port"] == 58082
    assert opts["mode"][0] == "transparent@127.0.0.1:58082"
    assert opts["secure_proxy_ready_marker"] == str(
        tmp_path / "run/interceptor/interceptor-2.ready"
    )
