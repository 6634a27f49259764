"""Well-known paths and ports, in one place.

Every path can be moved with an environment variable so tests and the sandbox
engine can run the same code against a scratch root.
"""

from __future__ import annotations

import os
from pathlib import Path

INTERCEPTOR_PORT = int(os.environ.get("SECURE_PROXY_PORT", "58080"))
PROXY_USER = os.environ.get("SECURE_PROXY_USER", "proxy-user")


def _path(var: str, default: str) -> Path:
    return Path(os.environ.get(var, default))


def share_dir() -> Path:
    """Directory holding defaults.json, allow-all.json and the schema."""
    override = os.environ.get("SECURE_PROXY_SHARE")
    if override:
        return Path(override)
    installed = Path("/opt/secure-proxy")
    if (installed / "defaults.json").is_file():
        return installed
    # Source checkout or editable install: config/ sits beside the package.
    return Path(__file__).resolve().parent.parent / "config"


def run_dir() -> Path:
    return _path("SECURE_PROXY_RUN_DIR", "/run/secure-proxy")


def policy_file() -> Path:
    return run_dir() / "policy.json"


def firewall_marker() -> Path:
    return run_dir() / "firewall.verified"


def interceptor_marker() -> Path:
    return run_dir() / "interceptor.ready"


def logs_dir() -> Path:
    return _path("SECURE_PROXY_LOGS_DIR", "/logs")


def traffic_log() -> Path:
    return logs_dir() / "traffic.jsonl"


def ca_cert() -> Path:
    return _path("SECURE_PROXY_CA_CERT", "/ca/certs/ca.pem")


def container_project_dir() -> Path:
    return _path("SECURE_PROXY_WORK_DIR", "/work")


REPO_CONFIG_RELATIVE = Path(".copilot_here") / "network.json"
