"""The firewall imports python-iptables once, cheaply, and leaves the process as it was:
ctypes' find_library, IPTABLES_LIBDIR and distutils are back once it returns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import ctypes.util, os, sys
original = ctypes.util.find_library
from firewall import iptables
iptc = iptables._iptc()
assert iptables._iptc() is iptc is sys.modules["iptc"]
assert ctypes.util.find_library is original
assert "IPTABLES_LIBDIR" not in os.environ
assert sys.modules.get("distutils", "absent") is not None  # not left blocked
assert sys.modules.get("distutils.sysconfig", "absent") is not None
assert callable(iptc.Table) and callable(iptc.Table6)
print("END")
"""


def test_iptc_imports_once_and_restores_the_process() -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "END"
