"""The interceptor defers ldap3/passlib.apache (start-up time) and they still work on use."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import runtime.container.interceptor
import mitmproxy.addons.proxyauth as proxyauth
assert type(sys.modules["ldap3"]).__name__ == "_LazyModule", type(sys.modules["ldap3"])
assert type(sys.modules["passlib.apache"]).__name__ == "_LazyModule"
# Used after all: the module runs on first attribute access.
assert proxyauth.ldap3.Server("ldap://127.0.0.1").host == "127.0.0.1"
assert callable(proxyauth.passlib.apache.HtpasswdFile)
print("END")
"""


def test_proxyauth_modules_load_lazily_and_work() -> None:
    r = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "END"
