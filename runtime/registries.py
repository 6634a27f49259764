"""Package registry hosts, read from the package managers' own configuration.

The built-in defaults allow the npm and PyPI registries. Rather than a second
copy of their names, we ask the tools: npm's configured registry and pip's
index (PyPI by default, or the mirror named by PIP_INDEX_URL). An image
configured for a corporate mirror therefore allows that mirror out of the box.

Only the installer asks (detect(), at image build or sandbox lay-out) and records
the answer in registries.json; everything else only reads that record
(registry_hosts()). The host CLI never runs npm or pip: on a host install there
is no record, and it says so instead of listing the hosts of the host's tools,
which are not the image's.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

REGISTRIES_FILE = "registries.json"


def _host(url: str) -> str | None:
    return urlsplit(url.strip()).hostname if url.strip() else None


def _stdout(argv: list[str]) -> str:
    """What a tool prints, or "" when it cannot be run or hangs."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def npm_hosts() -> list[str]:
    # npm itself reads the lower-case name; accept both.
    url = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")  # noqa: SIM112
    if not url and shutil.which("npm"):
        url = _stdout(["npm", "config", "get", "registry"])
    host = _host(url or "")
    return [host] if host else []


# Where Debian (python3-pip-whl, pulled in by python3-venv) and CPython keep the
# pip wheel that `python3 -m venv` installs: pip's defaults are readable there
# even where no pip is installed, as in the image's runtime venv.
PIP_WHEEL_GLOBS = (
    "/usr/share/python-wheels/pip-*.whl",
    f"{sysconfig.get_paths()['stdlib']}/ensurepip/_bundled/pip-*.whl",
)
_READ_PYPI = (
    "import sys; sys.path[:0] = sys.argv[1:]; "
    "from pip._internal.models.index import PyPI; "
    "print(PyPI.netloc, PyPI.file_storage_domain)"
)


def _pip_default_hosts(pip_wheels: Sequence[Path] = ()) -> list[str]:
    """pip's default index and file hosts, from an importable pip or pip's wheel (the
    system's, else one of `pip_wheels`: the image has no python3-venv, whose
    python3-pip-whl used to bring one, but the builder's wheel directory has pip's)."""
    wheels = [w for pattern in PIP_WHEEL_GLOBS for w in sorted(glob.glob(pattern))]
    wheels = wheels or [str(w) for w in sorted(pip_wheels)]
    return _stdout([sys.executable, "-c", _READ_PYPI, *wheels[-1:]]).split()


def pypi_hosts(pip_wheels: Sequence[Path] = ()) -> list[str]:
    urls = os.environ.get("PIP_INDEX_URL", "").split()
    if urls:
        return [h for h in (_host(u) for u in urls) if h]
    return _pip_default_hosts(pip_wheels)


def detect(pip_wheels: Sequence[Path] = ()) -> dict[str, list[str]]:
    return {"npm": npm_hosts(), "pypi": pypi_hosts(pip_wheels)}


def registry_hosts(share: Path) -> dict[str, list[str]] | None:
    """The registry hosts the installer recorded; None when it recorded none here
    (a host install). Never detects: that runs npm and pip."""
    recorded = share / REGISTRIES_FILE
    try:
        data = json.loads(recorded.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {
        str(name): [str(h) for h in hosts]
        for name, hosts in data.items()
        if isinstance(hosts, list)
    }


def record(share: Path, pip_wheels: Sequence[Path] = ()) -> dict[str, list[str]]:
    """The installer's call: ask the tools, write registries.json."""
    hosts = detect(pip_wheels)
    (share / REGISTRIES_FILE).write_text(json.dumps(hosts, indent=2) + "\n")
    return hosts
