"""UpstreamPinning under mitmproxy's test context: resolve once, check, connect to the address.

The resolver is a stand-in that counts its questions (no test asks a real resolver);
tests/e2e/test_upstream_addresses.py runs the same against real servers.
"""

from __future__ import annotations

import inspect
import socket
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from runtime.container.interceptor import upstream
from runtime.container.interceptor.gate import DECISION_HEADER, PolicyGate, verdict_of
from runtime.container.interceptor.logger import TrafficLogger
from runtime.container.interceptor.policystore import PolicyStore
from runtime.container.interceptor.upstream import UpstreamPinning
from runtime.core.policy import Mode, Origin, Policy, make_rule
from runtime.trafficlog import read_lines

CONFIG = "/work/.copilot_here/network.json"
USER = Origin("user", CONFIG)
DIALLED = "198.18.7.7"
ANSWERS = {
    "public.test": ["198.18.100.1", "2001:db8::1"],
    "loopback.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "lan.test": ["10.1.2.3", "fd00::3"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mixed.test": ["127.0.0.1", "198.18.100.9"],
    "registry.corp.test": ["10.9.9.9"],
}


class Resolver:
    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []
        self.answers = {name: list(addresses) for name, addresses in ANSWERS.items()}

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host in self.answers:
            return self.answers[host]
        if host[:1].isdigit() or ":" in host:
            return [host]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def policy(mode: Mode = Mode.ENFORCE) -> Policy:
    names = ("public.test", "loopback.test", "metadata.test", "lan.test", "mapped.test")
    rules = [make_rule(name, origin=USER) for name in (*names, "mixed.test", "nowhere.test")]
    rules.append(make_rule("registry.corp.test", origin=USER, allow_private_addresses=True))
    rules.append(make_rule("127.0.0.1", origin=USER))
    return Policy.build(mode, True, rules, CONFIG)


def make_flow(url: str, *, sni: str | None = "", client: Any = None) -> http.HTTPFlow:
    """A flow as transparent mode hands it to addons: request.host is the dialled IP."""
    req = http.Request.make("GET", url)
    req.headers["Host"] = req.host
    name = req.host
    req.data.host = DIALLED
    if client is None:
        client = tflow.tclient_conn()
        client.sni = (name if req.scheme == "https" else None) if sni == "" else sni
        client.proxy_mode = ProxyMode.parse("transparent")
        client.sockname = (DIALLED, req.port)
    return tflow.tflow(client_conn=client, req=req)


def drive(result: Any) -> None:
    """Run an async hook to its end: the stand-in resolver never has to wait."""
    if not inspect.iscoroutine(result):
        return
    try:
        result.send(None)
    except StopIteration:
        return
    raise AssertionError("the hook waited for something")


@pytest.fixture
def chain(tmp_path: Path):
    store = PolicyStore(policy())
    gate = PolicyGate(store)
    resolver = Resolver()
    pin = UpstreamPinning(resolve=resolver)
    log = TrafficLogger()
    with taddons.context(store, gate, pin, log) as tctx:
        tctx.configure(log, secure_proxy_traffic_log=str(tmp_path / "traffic.jsonl"))
        yield store, gate, pin, log, resolver, tmp_path / "traffic.jsonl"


def request(chain, flow: http.HTTPFlow) -> http.HTTPFlow:
    _store, gate, pin, log, *_ = chain
    gate.requestheaders(flow)
    drive(pin.requestheaders(flow))
    log.requestheaders(flow)
    return flow


def connect(pin: UpstreamPinning, flow: http.HTTPFlow) -> connection.Server:
    """What mitmproxy does next for a TLS request: a server connection to request.host,
    whose SNI it first sets to the address (the name is not in the address any more)."""
    server = connection.Server(address=(flow.request.host, flow.request.port))
    server.sni = flow.request.host
    pin.server_connect(
        server_hooks.ServerConnectionHookData(server=server, client=flow.client_conn)
    )
    return server


def test_connects_to_the_resolved_address_and_verifies_the_name(chain):
    *_, pin, _log, resolver, _ = chain
    flow = request(chain, make_flow("https://public.test/x"))
    assert flow.response is None
    assert (flow.request.host, flow.request.port) == ("198.18.100.1", 443)
    assert flow.request.headers["Host"] == "public.test"  # what the client sent stays
    assert connect(pin, flow).sni == "public.test"  # certificate checked for the name
    assert resolver.asked == [("public.test", 443)]


@pytest.mark.parametrize(
    ("name", "address", "what"),
    [
        ("loopback.test", "127.0.0.1", "loopback"),
        ("metadata.test", "169.254.169.254", "link-local"),
        ("lan.test", "10.1.2.3", "private"),
        ("mapped.test", "::ffff:127.0.0.1", "loopback (IPv4-mapped)"),
    ],
)
def test_enforce_refuses_a_name_that_resolves_off_the_internet(chain, name, address, what):
    *_, log_file = chain
    flow = request(chain, make_flow(f"https://{name}/latest/meta-data"))
    assert flow.request.host == DIALLED  # never pinned
    assert flow.response.status_code == 403
    assert flow.response.headers[DECISION_HEADER] == "block; reason=private_address"
    text = flow.response.text
    assert text.startswith(f"BLOCKED: GET https://{name}/latest/meta-data\n")
    assert f"address: {address} ({what})\n" in text
    assert '"allow_private_addresses": true' in text
    [start] = read_lines(log_file)
    assert (start["action"], start["reason"], start["violation"]) == (
        "BLOCK",
        "private_address",
        False,
    )


def test_a_mixed_answer_connects_to_the_internet_address(chain):
    flow = request(chain, make_flow("https://mixed.test/"))
    assert flow.response is None and flow.request.host == "198.18.100.9"


def test_the_rule_field_and_an_ip_literal_rule_allow(chain):
    *_, pin, _log, _resolver, _ = chain
    flow = request(chain, make_flow("https://registry.corp.test/v2/"))
    assert flow.response is None and flow.request.host == "10.9.9.9"
    assert connect(pin, flow).sni == "registry.corp.test"
    literal = request(chain, make_flow("http://127.0.0.1/x", sni=None))
    assert literal.response is None and literal.request.host == "127.0.0.1"


def test_monitor_connects_and_logs_a_violation(chain):
    store, *_, log_file = chain
    store.policy = policy(Mode.MONITOR)
    flow = request(chain, make_flow("https://metadata.test/x"))
    assert flow.response is None and flow.request.host == "169.254.169.254"
    [start] = read_lines(log_file)
    assert (start["action"], start["reason"], start["violation"]) == (
        "ALLOW",
        "private_address",
        True,
    )


def test_allow_all_checks_nothing(chain):
    store, *_ = chain
    store.policy = Policy.build(Mode.ALLOW_ALL, False, (), "built-in defaults")
    flow = request(chain, make_flow("https://loopback.test/x"))
    assert flow.response is None and flow.request.host == "127.0.0.1"


def test_a_name_that_does_not_resolve_gets_502_and_is_logged_once(chain):
    *_, log, _resolver, log_file = chain
    flow = request(chain, make_flow("https://nowhere.test/x"))
    assert flow.request.host == DIALLED
    assert flow.response.status_code == 502
    assert "cannot resolve nowhere.test" in flow.response.text
    log.response(flow)
    _start, end = read_lines(log_file)
    assert (end["action"], end["reason"], end["status"]) == ("ALLOW", "rule_match", 502)


def test_one_lookup_per_name_and_client_connection(chain):
    *_, pin, _log, resolver, _ = chain
    first = request(chain, make_flow("https://public.test/a"))
    # The name now points elsewhere: this connection keeps the address it checked...
    resolver.answers["public.test"] = ["127.0.0.1"]
    second = request(chain, make_flow("https://public.test/b", client=first.client_conn))
    assert second.response is None and second.request.host == "198.18.100.1"
    assert resolver.asked == [("public.test", 443)]
    # ...a new connection asks again, and the new answer is checked like any other.
    pin.client_disconnected(first.client_conn)
    third = request(chain, make_flow("https://public.test/c"))
    assert third.response.status_code == 403
    assert len(resolver.asked) == 2 and not pin.clients.get(first.client_conn.id)


def test_a_long_lived_connection_asks_again_after_a_while(chain, monkeypatch):
    *_, resolver, _ = chain
    monkeypatch.setattr(upstream, "ANSWER_SECONDS", 0.0)  # every answer is old at once
    first = request(chain, make_flow("https://public.test/a"))
    resolver.answers["public.test"] = ["198.18.100.5"]  # the host moved
    second = request(chain, make_flow("https://public.test/b", client=first.client_conn))
    assert second.request.host == "198.18.100.5" and len(resolver.asked) == 2


def test_one_tls_connection_never_carries_two_names_to_one_address(chain):
    """Without SNI, Host headers may name two hosts on one TLS connection; mitmproxy would
    reuse the upstream connection verified for the first name for the second."""
    *_, resolver, _ = chain
    resolver.answers["loopback.test"] = ["198.18.100.1"]  # now at public.test's address
    first = request(chain, make_flow("https://public.test/a", sni=None))
    assert first.response is None
    second = request(chain, make_flow("https://loopback.test/b", client=first.client_conn))
    assert second.response.status_code == 502
    assert "send the request for loopback.test on a connection of its own" in second.response.text


def test_plain_http_server_connections_keep_no_sni(chain):
    *_, pin, _log, _resolver, _ = chain
    flow = request(chain, make_flow("http://public.test/x"))
    server = connection.Server(address=(flow.request.host, 80))
    pin.server_connect(
        server_hooks.ServerConnectionHookData(server=server, client=flow.client_conn)
    )
    assert server.sni is None


def test_an_error_while_pinning_closes_the_request(chain):
    *_, pin, _log, _resolver, _ = chain

    async def broken(host: str, port: int) -> list[str]:
        raise RuntimeError("boom")

    pin.resolve = broken
    flow = request(chain, make_flow("https://public.test/x"))
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    assert flow.request.host == DIALLED
    assert verdict_of(flow) is not None
