"""Package registry hosts, read from the package managers' own configuration.

The built-in defaults allow the npm and PyPI registries. Rather than a second
copy of their names, we ask the tools: npm's configured registry and pip's
index (PyPI by default, or the mirror named by PIP_INDEX_URL). An image
configured for a corporate mirror therefore allows that mirror out of the box.
The installer records the answer in registries.json at build time so the
container start does not run npm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

REGISTRIES_FILE = "registries.json"


def _host(url: str) -> str | None:
    return urlsplit(url.strip()).hostname if url.strip() else None


def npm_hosts() -> list[str]:
    # npm itself reads the lower-case name; accept both.
    url = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")  # noqa: SIM112
    if not url and shutil.which("npm"):
        try:
            url = subprocess.run(
                ["npm", "config", "get", "registry"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            url = ""
    host = _host(url or "")
    return [host] if host else []


def pypi_hosts() -> list[str]:
    urls = os.environ.get("PIP_INDEX_URL", "").split()
    if urls:
        return [h for h in (_host(u) for u in urls) if h]
    try:
        from pip._internal.models.index import PyPI
    except ImportError:
        return []
    return [PyPI.netloc, PyPI.file_storage_domain]


def detect() -> dict[str, list[str]]:
    return {"npm": npm_hosts(), "pypi": pypi_hosts()}


def registry_hosts(share: Path) -> dict[str, list[str]]:
    """Recorded registry hosts if the installer wrote them, else detected now."""
    recorded = share / REGISTRIES_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())
    return detect()


def record(share: Path) -> dict[str, list[str]]:
    hosts = detect()
    (share / REGISTRIES_FILE).write_text(json.dumps(hosts, indent=2) + "\n")
    return hosts
