"""The interceptor addons under mitmproxy's own test context (taddons + tflow)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import jsonschema
import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from runtime import interceptor
from runtime.explain import explain
from runtime.interceptor import (
    DECISION_HEADER,
    PolicyGate,
    PolicyReloader,
    Readiness,
    TrafficLogger,
    UpstreamPinning,
    verdict_of,
)
from runtime.policy import Mode, Origin, Policy, make_rule
from runtime.resolve import write_policy
from runtime.trafficlog import FIELDS, read_lines, schema_path

CONFIG = "/work/.copilot_here/network.json"
USER = Origin("user", CONFIG)
DIALLED = "198.18.7.7"


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
    gate = PolicyGate(policy())
    pin = UpstreamPinning()
    log = TrafficLogger(gate)
    reloader = PolicyReloader(gate)
    with taddons.context(gate, pin, log, reloader) as tctx:
        tctx.configure(log, secure_proxy_traffic_log=str(tmp_log))
        yield tctx, gate, pin, log, reloader


def run(addons, flow: http.HTTPFlow, status: int = 200, body: bytes = b"hello") -> None:
    """Drive the hooks in the order mitmproxy calls them for one request."""
    _tctx, gate, pin, log, _ = addons
    gate.requestheaders(flow)
    pin.requestheaders(flow)
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


def lines(path: Path) -> list[dict]:
    return read_lines(path) if path.exists() else []


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
    assert flow.request.host == "api.github.com"  # not the dialled IP
    assert flow.request.port == 443
    assert flow.request.headers["Host"] == "api.github.com"
    [line] = lines(tmp_log)
    validate(line)
    assert list(line) == list(FIELDS)
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
    assert flow.request.host == "npm.registry.test"


def test_plain_http_uses_host_header(addons, tmp_log):
    flow = make_flow("http://npm.registry.test/x", sni=None, host="NPM.Registry.TEST:80")
    run(addons, flow)
    assert flow.response.status_code == 200
    assert flow.request.host == "npm.registry.test"
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
    gate.policy = policy(Mode.MONITOR, False)
    flow = make_flow("https://evil.test/x", sni="evil.test")
    run(addons, flow)
    assert flow.response.status_code == 200
    assert flow.request.host == "evil.test"
    [line] = lines(tmp_log)
    assert line["action"] == "ALLOW" and line["violation"] is True
    assert line["mode"] == "monitor" and line["reason"] == "host_not_allowed"
    validate(line)


@pytest.mark.parametrize("log_to_file", [False, True])
def test_allow_all_logs_only_with_log_to_file(addons, tmp_log, log_to_file):
    _tctx, gate, *_ = addons
    gate.policy = Policy.build(Mode.ALLOW_ALL, log_to_file, (), "built-in defaults")
    flow = make_flow("https://evil.test/x", sni="evil.test")
    run(addons, flow)
    assert flow.response.status_code == 200
    got = lines(tmp_log)
    assert len(got) == (1 if log_to_file else 0)
    if got:
        assert got[0]["reason"] == "allow_all" and got[0]["mode"] == "allow-all"


def test_no_policy_fails_closed():
    gate = PolicyGate(None)
    flow = make_flow("https://api.github.com/repos/x")
    gate.requestheaders(flow)
    assert flow.response.status_code == 403


# --------------------------------------------------------------------------- logging


def test_upstream_error_is_logged_once_as_502(addons, tmp_log):
    _tctx, gate, pin, log, _ = addons
    flow = make_flow("https://api.github.com/repos/x")
    gate.requestheaders(flow)
    pin.requestheaders(flow)
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
    pin.requestheaders(flow)
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
    tctx, gate, _pin, _log, reloader = addons
    policy_file = tmp_path / "policy.json"
    tctx.configure(reloader, secure_proxy_policy=str(policy_file))
    client = make_flow("https://evil.test/", sni="evil.test").client_conn

    def request() -> int:
        flow = make_flow("https://evil.test/x", sni="evil.test")
        flow.client_conn = client
        run(addons, flow)
        return flow.response.status_code

    assert request() == 403
    write_policy(policy(Mode.ENFORCE, True, make_rule("evil.test")), policy_file)
    old = gate.policy
    assert reloader.reload() is True
    assert gate.policy is not old
    assert request() == 200

    # Broken and missing files keep the policy in force.
    current = gate.policy
    policy_file.write_text("{ not json")
    assert reloader.reload() is False
    assert gate.policy is current
    policy_file.write_text(json.dumps({"version": 99}))
    assert reloader.reload() is False
    policy_file.unlink()
    assert reloader.reload() is False
    assert gate.policy is current
    assert request() == 200


def test_sighup_handler_installed_on_running_loop(tmp_path):
    gate = PolicyGate(policy())
    reloader = PolicyReloader(gate)
    policy_file = tmp_path / "policy.json"
    write_policy(policy(Mode.MONITOR, True), policy_file)

    async def scenario() -> Mode:
        with taddons.context(gate, reloader) as tctx:
            tctx.configure(reloader, secure_proxy_policy=str(policy_file))
            reloader.running()
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                for _ in range(200):
                    if gate.policy.mode is Mode.MONITOR:
                        break
                    await asyncio.sleep(0.01)
                return gate.policy.mode
            finally:
                reloader.done()

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
    bundle = interceptor.build_upstream_bundle(tmp_path, str(extra), system)
    assert bundle.read_text() == "SYSTEM\nEXTRA\n"
    with pytest.raises(FileNotFoundError):
        interceptor.build_upstream_bundle(tmp_path, str(tmp_path / "nope"), system)


def test_options_are_the_ones_the_issue_asks_for(tmp_path):
    opts = interceptor.mitmproxy_options(
        confdir=tmp_path,
        listen_host="",
        listen_port=58080,
        upstream_bundle=tmp_path / "b.pem",
        policy_file=tmp_path / "p.json",
        traffic_log=tmp_path / "t.jsonl",
        ca_cert=tmp_path / "ca.pem",
        ready_marker=tmp_path / "ready",
        verbosity="warn",
    )
    assert opts["mode"] == ["transparent@127.0.0.1:58080", "transparent@::1:58080"]
    assert opts["listen_port"] == 58080
    assert opts["connection_strategy"] == "lazy" and opts["onboarding"] is False
    assert opts["flow_detail"] == 0 and opts["stream_large_bodies"] == "1m"
    assert opts["ssl_verify_upstream_trusted_ca"] == str(tmp_path / "b.pem")
