"""The sign-in token's placeholder and its swap: the pure core (runtime.core.credentials),
the init's side (runtime.container.signin) and the interceptor's addon under
mitmproxy's test context (runtime.container.interceptor.credentials)."""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import string
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from runtime.container import signin
from runtime.container.interceptor import make_addons
from runtime.container.interceptor.credentials import CredentialGuard, Scrub
from runtime.container.interceptor.gate import (
    DECISION_HEADER,
    Counter,
    PolicyGate,
    verdict_of,
)
from runtime.container.interceptor.logger import TrafficLogger
from runtime.container.interceptor.policystore import PolicyStore
from runtime.core import credentials as core
from runtime.core.explain import explain
from runtime.core.policy import Mode, Policy, Reason, make_rule
from runtime.trafficlog import read_lines

REAL = "gho_" + "".join(random.Random(7).choices(string.ascii_letters + string.digits, k=36))
FINE = "github_pat_11ABCDEFG0" + "x" * 12 + "_" + "Yz9" * 20


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ----------------------------------------------------------------------------- the shape


@pytest.mark.parametrize(
    "token",
    [
        REAL,
        "ghp_" + "a1B2" * 9,
        "ghu_" + "Z" * 36,
        "ghs_" + "0123456789" * 4,
        FINE,
        "0123456789abcdef0123456789abcdef01234567",  # a classic 40-hex OAuth token
    ],
)
def test_placeholder_keeps_the_prefix_length_and_character_classes(token):
    made = core.placeholder_for(token, secrets.choice)
    assert made is not None and made != token
    assert len(made) == len(token)
    prefix = core.prefix_of(token)
    assert made.startswith(prefix)
    for a, b in zip(token[len(prefix) :], made[len(prefix) :], strict=True):
        if a.isdigit():
            assert b.isdigit()
        elif a.islower():
            assert b.islower()
        elif a.isupper():
            assert b.isupper()
        else:
            assert a == b  # the `_` inside a fine-grained PAT stays
    # Random each time: two placeholders of one token differ.
    assert core.placeholder_for(token, secrets.choice) != made


def test_a_token_too_short_to_stand_in_for_gets_none():
    assert core.placeholder_for("ghp_short", secrets.choice) is None
    assert core.placeholder_for("x" * (core.MIN_RANDOM - 1), secrets.choice) is None


@pytest.mark.parametrize(
    ("host", "gets"),
    [
        ("github.com", True),
        ("api.github.com", True),
        ("copilot-proxy.githubusercontent.com", True),
        ("api.githubcopilot.com", True),
        ("api.individual.githubcopilot.com", True),
        ("githubcopilot.com", False),
        ("evilgithubcopilot.com", False),
        ("github.com.evil.test", False),
        ("gist.github.com", False),
        ("raw.githubusercontent.com", False),
        ("example.com", False),
    ],
)
def test_token_hosts(host, gets):
    assert core.is_token_host(host) is gets


# ----------------------------------------------------------------------------- the swap


PH = core.placeholder_for(REAL, secrets.choice)
assert PH is not None
REAL_OF = {PH: REAL}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"token {PH}", f"token {REAL}"),
        (f"Bearer {PH}", f"Bearer {REAL}"),
        (f"bearer  {PH} ", f"bearer {REAL}"),
        (f"Basic {b64('x-access-token:' + PH)}", f"Basic {b64('x-access-token:' + REAL)}"),
        (f"Basic {b64(PH + ':x-oauth-basic')}", f"Basic {b64(REAL + ':x-oauth-basic')}"),
        (f"Bearer {REAL}", None),  # nothing to swap
        (f"Bearer {PH}x", None),  # not the placeholder
        (f"Digest {PH}", None),
        ("Basic !!notbase64", None),
        (f"Basic {b64(PH)}", None),  # no user:password
    ],
)
def test_swap_authorization(value, expected):
    assert core.swap_authorization(value, REAL_OF) == expected


@pytest.mark.parametrize(
    ("headers", "url", "where"),
    [
        ([("Authorization", f"Bearer {PH}")], ["/"], "Authorization"),
        ([("X-Api-Key", PH)], ["/"], "X-Api-Key"),
        ([("Cookie", f"a=1; t={PH}")], ["/"], "Cookie"),
        ([("Authorization", f"Basic {b64('u:' + PH)}")], ["/"], "Authorization"),
        ([], [f"/exfil?t={PH}"], "url"),
        ([], ["/exfil?t=" + "".join(f"%{ord(c):02X}" for c in PH)], "url"),
        ([], ["/x", f"{PH}.evil.test"], "url"),
        ([("Accept", "*/*")], ["/fine?q=1"], None),
    ],
)
def test_carries_placeholder(headers, url, where):
    assert core.carries_placeholder([PH], headers, url) == where


# ----------------------------------------------------------------------------- the init's side


def test_take_removes_every_token_variable_and_the_switch():
    environ = {
        "GH_TOKEN": REAL,
        "GITHUB_TOKEN": REAL,
        "COPILOT_GITHUB_TOKEN": " ",
        "SECURE_PROXY_SIGNIN": "pass-through",
        "PATH": "/bin",
    }
    tokens = signin.take(environ)
    assert environ == {"PATH": "/bin"}
    assert tokens.by_name == {"GH_TOKEN": REAL, "GITHUB_TOKEN": REAL}
    assert tokens.pass_through
    assert tokens.for_command() == {"GH_TOKEN": REAL, "GITHUB_TOKEN": REAL}


def test_swap_writes_the_pairs_0400_and_gives_the_command_placeholders(tmp_path):
    tokens = signin.take({"GH_TOKEN": REAL, "GITHUB_TOKEN": REAL})
    path = tmp_path / "credentials.json"
    path.write_text("stale")
    signin.swap(tokens, (os.getuid(), os.getgid()), path)
    given = tokens.for_command()
    assert given["GH_TOKEN"] == given["GITHUB_TOKEN"] != REAL
    assert given["GH_TOKEN"].startswith("gho_") and len(given["GH_TOKEN"]) == len(REAL)
    assert oct(path.stat().st_mode & 0o777) == "0o400"
    assert signin.read(path) == {given["GH_TOKEN"]: REAL}


def test_read_refuses_a_broken_file_and_none_is_empty(tmp_path):
    assert signin.read(tmp_path / "none.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": [{"placeholder": REAL, "token": REAL}]}))
    with pytest.raises(signin.CredentialsError, match="unswapped"):
        signin.read(bad)
    bad.write_text("{")
    with pytest.raises(signin.CredentialsError, match="not a credentials file"):
        signin.read(bad)


# ----------------------------------------------------------------------------- the addon

CONFIG = "/work/.copilot_here/network.json"


def make_flow(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    req = http.Request.make(method, url, b"", headers or {})
    req.headers["Host"] = req.host
    sni = req.host if req.scheme == "https" else None
    port = req.port
    req.data.host = "198.18.7.7"
    client = tflow.tclient_conn()
    client.sni = sni
    client.proxy_mode = ProxyMode.parse("transparent")
    client.sockname = ("198.18.7.7", port)
    return tflow.tflow(client_conn=client, req=req)


@pytest.fixture
def guarded(tmp_path):
    """Gate, guard and the traffic log, with the pairs of credentials.json (pinning, which
    resolves names, is tested on its own in test_upstream_pinning)."""
    creds = tmp_path / "credentials.json"
    signin.write({REAL: PH}, (os.getuid(), os.getgid()), creds)
    rules = [
        make_rule("api.github.com"),
        make_rule("github.com"),
        make_rule("*.githubcopilot.com"),
        make_rule("example.com"),
    ]
    store = PolicyStore(Policy.build(Mode.ENFORCE, True, rules, CONFIG))
    gate = PolicyGate(store)
    guard = CredentialGuard()
    log = TrafficLogger()
    with taddons.context(store, gate, guard, log) as tctx:
        tctx.configure(log, secure_proxy_traffic_log=str(tmp_path / "traffic.jsonl"))
        tctx.configure(guard, secure_proxy_credentials=str(creds))

        def run(flow: http.HTTPFlow) -> http.HTTPFlow:
            for addon in (gate, guard, log):
                addon.requestheaders(flow)
            return flow

        yield run, guard, log, tmp_path / "traffic.jsonl"


@pytest.mark.parametrize(
    ("url", "auth", "sent"),
    [
        ("https://api.github.com/copilot_internal/user", f"token {PH}", f"token {REAL}"),
        ("https://api.individual.githubcopilot.com/chat", f"Bearer {PH}", f"Bearer {REAL}"),
        (
            "https://github.com/o/r.git/info/refs",
            f"Basic {b64('x-access-token:' + PH)}",
            f"Basic {b64('x-access-token:' + REAL)}",
        ),
    ],
)
def test_the_token_replaces_the_placeholder_for_github_and_copilot(guarded, url, auth, sent):
    run, *_ = guarded
    flow = run(make_flow(url, {"Authorization": auth}))
    assert flow.response is None  # goes upstream
    assert flow.request.headers["Authorization"] == sent


def test_plain_http_to_github_never_gets_the_token(guarded):
    """In clear text the token would cross the network: not swapped, and refused."""
    run, *_ = guarded
    flow = run(make_flow("http://api.github.com/x", {"Authorization": f"token {PH}"}))
    assert flow.request.headers["Authorization"] == f"token {PH}"
    assert flow.response is not None and flow.response.status_code == 403
    assert verdict_of(flow).decision.reason is Reason.CREDENTIAL_LEAK


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        ({"Authorization": f"Bearer {PH}"}, "/leak"),
        ({"X-Token": PH}, "/leak"),
        ({"Authorization": f"Basic {b64('x-access-token:' + PH)}"}, "/leak"),
        ({}, f"/leak?token={PH}"),
    ],
)
def test_the_placeholder_to_another_host_is_refused_and_logged(guarded, headers, path):
    run, _guard, log, traffic = guarded
    flow = run(make_flow(f"https://example.com{path}", headers))
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers[DECISION_HEADER] == "block; reason=credential_leak"
    assert verdict_of(flow).decision.reason is Reason.CREDENTIAL_LEAK
    assert REAL not in flow.request.headers.get("Authorization", "")
    body = flow.response.get_text()
    assert "reason: credential_leak" in body and REAL not in body
    log.response(flow)
    lines = read_lines(traffic)
    assert [(x["phase"], x["reason"], x["action"]) for x in lines] == [
        ("start", "credential_leak", "BLOCK"),
        ("end", "credential_leak", "BLOCK"),
    ]
    assert REAL not in traffic.read_text()


def test_in_monitor_mode_too(tmp_path):
    creds = tmp_path / "credentials.json"
    signin.write({REAL: PH}, (os.getuid(), os.getgid()), creds)
    store = PolicyStore(Policy.build(Mode.MONITOR, True, [], CONFIG))
    gate, guard = PolicyGate(store), CredentialGuard()
    with taddons.context(store, gate, guard) as tctx:
        tctx.configure(guard, secure_proxy_credentials=str(creds))
        flow = make_flow("https://example.com/", {"X-Token": PH})
        gate.requestheaders(flow)
        assert not verdict_of(flow).decision.blocked  # monitor: a violation, let through
        guard.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 403


def test_requests_without_the_placeholder_are_untouched(guarded):
    run, *_ = guarded
    flow = run(make_flow("https://example.com/ok", {"Authorization": "Bearer other"}))
    assert flow.response is None and flow.request.headers["Authorization"] == "Bearer other"


def test_no_credentials_file_no_swap_and_a_broken_one_stops_the_start(tmp_path):
    guard = CredentialGuard()
    with taddons.context(guard) as tctx:
        tctx.configure(guard, secure_proxy_credentials=str(tmp_path / "none.json"))
        assert guard.real_of == {}
        (tmp_path / "bad.json").write_text("{")
        with pytest.raises(exceptions.OptionsError, match="not a credentials file"):
            tctx.configure(guard, secure_proxy_credentials=str(tmp_path / "bad.json"))


def test_the_guard_sits_after_the_gate_and_before_forwarding_and_the_log():
    names = [type(a).__name__ for a in make_addons()]
    assert (
        names.index("PolicyGate")
        < names.index("CredentialGuard")
        < names.index("UpstreamPinning")
        < names.index("TrafficLogger")
    )


def test_the_response_of_a_swapped_request_never_shows_the_token(guarded):
    run, guard, log, _ = guarded
    flow = run(make_flow("https://api.github.com/echo", {"Authorization": f"token {PH}"}))
    flow.response = http.Response.make(200, b"", {"X-Echo": f"token {REAL}"})
    guard.responseheaders(flow)
    log.responseheaders(flow)
    assert flow.response.headers["X-Echo"] == f"token {PH}"
    stream = flow.response.stream
    assert isinstance(stream, Scrub)
    body = f'{{"seen": "{REAL}", "again": "{REAL}"}}'.encode()
    # Cut everywhere, the token split across chunks included.
    for cut in range(1, len(body)):
        scrub = Scrub({REAL.encode(): PH.encode()}, Counter())
        out = scrub(body[:cut]) + scrub(body[cut:]) + scrub(b"")
        assert out == body.replace(REAL.encode(), PH.encode()), cut
        assert scrub.then.total == len(body)


def test_explain_names_the_hosts_the_token_goes_to():
    from runtime.core.policy import Action, Decision

    decision = Decision(Action.BLOCK, Reason.CREDENTIAL_LEAK, Mode.ENFORCE, "example.com", "/")
    text = explain(decision, "GET", "https://example.com/", CONFIG)
    assert "reason: credential_leak" in text
    assert "api.github.com" in text and "*.githubcopilot.com" in text


def test_the_init_hands_the_file_to_proxy_user_only(tmp_path):
    """Owned by the owner given (proxy-user), 0400: nobody else reads it."""
    path = signin.write({REAL: PH}, (os.getuid(), os.getgid()), tmp_path / "c.json")
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.getuid(), 0o400)
    assert Path(path).read_text().count(REAL) == 1


def test_the_interceptor_reads_the_file_the_init_writes_by_default(tmp_path, monkeypatch):
    """No flag given: the option is still set (to credentials.json in the run dir), so
    the guard's `configure` loads the pairs at start."""
    import asyncio

    from runtime.container.interceptor import main as interceptor_main

    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("SECURE_PROXY_UPSTREAM_CA", raising=False)
    (tmp_path / "run" / "interceptor").mkdir(parents=True)
    signin.write(
        {REAL: PH}, (os.getuid(), os.getgid()), tmp_path / "run/interceptor/credentials.json"
    )

    async def scenario() -> dict[str, str]:
        master = interceptor_main.make_master()
        args = interceptor_main.parse_args(master.options, ["--confdir", str(tmp_path / "c")])
        opts = interceptor_main.mitmproxy_options(args)
        guard = next(a for a in master.addons.chain if isinstance(a, CredentialGuard))
        master.options.update(
            **{k: v for k, v in opts.items() if k.startswith("secure_proxy_credentials")}
        )
        return guard.real_of

    assert asyncio.run(scenario()) == {PH: REAL}


def test_the_init_swaps_only_with_rules_enabled(tmp_path, monkeypatch, capsys):
    """init.sign_in: placeholders at level full, the token as it came otherwise (and
    when the host asked for pass-through); a token too short to stand in for is said."""
    from firewall.level import LockLevel
    from runtime.container import init

    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path))
    (tmp_path / "interceptor").mkdir()
    ids = init.Ids(1000, 1000, 1000, 1000, (os.getuid(), os.getgid()))
    for level, through, swapped in (
        (LockLevel.FULL, False, True),
        (LockLevel.FULL, True, False),
        (LockLevel.INTERCEPT, False, False),
        (LockLevel.NONE, False, False),
    ):
        environ = {"GH_TOKEN": REAL, **({"SECURE_PROXY_SIGNIN": "pass-through"} if through else {})}
        tokens = init.sign_in(init.Plan(level, False), ids, signin.take(environ))
        given = tokens.for_command()["GH_TOKEN"]
        assert (given != REAL) is swapped, level
        assert (tmp_path / "interceptor" / "credentials.json").exists() is swapped
        (tmp_path / "interceptor" / "credentials.json").unlink(missing_ok=True)
    tokens = init.sign_in(
        init.Plan(LockLevel.FULL, False), ids, signin.take({"GITHUB_TOKEN": "ghp_tooshort"})
    )
    assert tokens.for_command() == {"GITHUB_TOKEN": "ghp_tooshort"}
    assert "GITHUB_TOKEN too short to stand in for" in capsys.readouterr().err
