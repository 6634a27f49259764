"""The interceptor imports only the mitmproxy addons transparent mode runs: none of the
console/web/onboarding/proxy-auth stack (the image leaves those packages out, see
image/runtime-requirements.txt), and mitmproxy's own DumpMaster still works beside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Distributions image/runtime-requirements.txt leaves out, as top-level modules, and
#: mitmproxy modules that pull them (or are heavy and unused) in.
NEVER_IMPORTED = (
    "flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous", "blinker", "click",
    "ldap3", "passlib", "urwid", "wcwidth", "tornado", "pyperclip", "asgiref",
    "mitmproxy.contentviews", "mitmproxy.addons.onboarding", "mitmproxy.addons.proxyauth",
    "mitmproxy.addons.dumper", "mitmproxy.addons.export", "mitmproxy.tools",
)  # fmt: skip

PROBE = f"""
import asyncio, sys
import runtime.container.interceptor.main as main
from runtime.container.interceptor import lean

async def build():
    master = main.make_master()
    return sorted(master.options.keys()), [type(a).__name__ for a in master.addons.chain]

options, chain = asyncio.run(build())
assert lean.active(), "mitmproxy.addons ran its own package body"
loaded = [m for m in {NEVER_IMPORTED!r} if m in sys.modules]
assert not loaded, loaded
# Left-out addons' options are undeclared: setting one fails instead of doing nothing.
for name in ("onboarding", "proxyauth", "flow_detail", "block_global", "scripts"):
    assert name not in options, name
assert chain[:7] == ["TermLog", "Core", "DisableH2C", "Proxyserver", "NextLayer",
                     "TlsConfigCALoadedOnce", "ErrorCheck"], chain
assert chain[7:] == ["PolicyStore", "BlockSink", "HttpOnly", "UpgradeGuard", "PolicyGate",
                     "CredentialGuard", "UpstreamPinning", "TrafficLogger", "Readiness"], chain
print("END")
"""

DUMP = """
import asyncio
import runtime.container.interceptor  # installs the lean mitmproxy.addons first
from mitmproxy.options import Options
from mitmproxy.tools.dump import DumpMaster
import mitmproxy.addons.proxyauth as proxyauth

async def build():
    return DumpMaster(Options(), with_termlog=False, with_dumper=True)

master = asyncio.run(build())
names = {type(a).__name__ for a in master.addons.chain}
assert {"Onboarding", "ProxyAuth", "Dumper", "Core", "NextLayer"} <= names, names
assert callable(proxyauth.ProxyAuth)
print("END")
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_the_interceptor_imports_only_what_transparent_mode_runs() -> None:
    r = run(PROBE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "END"


def test_mitmproxys_default_addons_still_load_beside_it() -> None:
    r = run(DUMP)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "END"


CA_ONCE = """
import asyncio, tempfile
import runtime.container.interceptor.main as main
from mitmproxy import certs, hooks

loads = []
real = certs.CertStore.from_store.__func__
certs.CertStore.from_store = classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k))

async def scenario():
    master = main.make_master()
    tls = master.addons.get("tlsconfig")
    with tempfile.TemporaryDirectory() as d:
        master.options.update(confdir=d)
        assert len(loads) == 1, loads
        master.addons.invoke_addon_sync(tls, hooks.RunningHook())
        assert len(loads) == 1, "the CA was loaded again at running"
        master.options.update(confdir=d + "/other")  # a real change still reloads
        assert len(loads) == 2, loads

asyncio.run(scenario())
print("END")
"""


def test_the_ca_is_loaded_once_at_start() -> None:
    r = run(CA_ONCE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "END"
