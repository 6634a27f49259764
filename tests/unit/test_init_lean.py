"""An inactive start is the init's own imports and a few system calls (goal: under
100 ms over the bare command, BENCHMARKS.md). What only a supervised run, an enabled
config or a wrong key needs stays out of the import of the init."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Modules the inactive path never uses; each costs 1-30 ms to import.
NEVER_IMPORTED = (
    "runtime.container.supervisor", "runtime.container.services", "runtime.container.ca",
    "runtime.container.logguard", "runtime.registries", "xmlrpc", "http.client",
    "cryptography", "loguru", "asyncio", "mitmproxy", "iptc", "idna", "difflib",
    "sysconfig", "tempfile",
)  # fmt: skip

PROBE = f"""
import sys
import runtime.container.init
from runtime.container import command
from runtime.resolve import find_config
loaded = [m for m in {NEVER_IMPORTED!r} if m in sys.modules]
assert not loaded, loaded
print("END")
"""


def test_the_inactive_path_imports_only_what_it_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "END"


def test_a_non_ascii_host_and_a_wrong_key_still_work() -> None:
    """The lazily imported modules are there when needed."""
    from runtime.core.config import ConfigError, parse_config
    from runtime.core.hosts import normalize_host

    assert normalize_host("bücher.example") == "xn--bcher-kva.example"
    try:
        parse_config('{"enabeld": true}', "network.json")
    except ConfigError as exc:
        assert 'rename it to "enabled"' in str(exc)
    else:
        raise AssertionError("a misspelt key was accepted")
