"""Well-known paths and ports, in one place.

Every path can be moved with an environment variable so tests and the sandbox
engine can run the same code against a scratch root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

INTERCEPTOR_PORT = int(os.environ.get("SECURE_PROXY_PORT", "58080"))
PROXY_USER = os.environ.get("SECURE_PROXY_USER", "proxy-user")
DNS_GUARD_PORT = int(os.environ.get("SECURE_PROXY_DNS_PORT", "58053"))


def _path(var: str, default: str) -> Path:
    return Path(os.environ.get(var, default))


def share_dir() -> Path:
    """Directory holding defaults.json and the schemas."""
    override = os.environ.get("SECURE_PROXY_SHARE")
    if override:
        return Path(override)
    installed = prefix_dir()
    if (installed / "defaults.json").is_file():
        return installed
    package = Path(__file__).resolve().parent
    # Source checkout or editable install: config/ sits beside the package.
    # Installed wheel: the same files ship as the runtime._config package.
    checkout = package.parent / "config"
    return checkout if (checkout / "defaults.json").is_file() else package / "_config"


def run_dir() -> Path:
    return _path("SECURE_PROXY_RUN_DIR", "/run/secure-proxy")


def policy_file() -> Path:
    return run_dir() / "policy.json"


def firewall_marker() -> Path:
    return run_dir() / "firewall.verified"


def prepared_marker() -> Path:
    """The init's word that what the services read at start is written (launch.py)."""
    return run_dir() / "prepared"


def interceptor_run_dir() -> Path:
    """Owned by proxy-user (made by init): run_dir() itself is root's, so the
    interceptor can publish its marker without being able to touch policy.json,
    the firewall marker or the supervisor socket."""
    return run_dir() / "interceptor"


def interceptor_marker(worker: int = 0) -> Path:
    """Worker n's readiness marker (worker 0's keeps the name of the single process)."""
    return interceptor_run_dir() / (
        "interceptor.ready" if worker == 0 else f"interceptor-{worker}.ready"
    )


def interceptor_markers() -> list[Path]:
    """Every worker's marker that may be there (stale ones are removed at start)."""
    return sorted(interceptor_run_dir().glob("interceptor*.ready"))


def dnsguard_marker() -> Path:
    """The DNS guard runs as proxy-user too: its marker sits beside the interceptor's."""
    return interceptor_run_dir() / "dnsguard.ready"


def portkeeper_dir() -> Path:
    """Root's, 0755: holds the port keeper's socket (proxy-user's, 0600: only the DNS
    guard may ask it to open a port) and its ready marker."""
    return run_dir() / "portkeeper"


def portkeeper_socket() -> Path:
    return portkeeper_dir() / "keeper.sock"


def portkeeper_marker() -> Path:
    return portkeeper_dir() / "portkeeper.ready"


def credentials_file() -> Path:
    """The sign-in token and its placeholder, for the interceptor alone: proxy-user's,
    0400, written by the init (runtime.container.signin) when rules are enabled."""
    return interceptor_run_dir() / "credentials.json"


def logs_dir() -> Path:
    return _path("SECURE_PROXY_LOGS_DIR", "/logs")


def traffic_log() -> Path:
    return logs_dir() / "traffic.jsonl"


def ca_cert() -> Path:
    return _path("SECURE_PROXY_CA_CERT", "/ca/certs/ca.pem")


def ca_dir() -> Path:
    """Where the interceptor publishes its CA certificate (owned by proxy-user)."""
    return ca_cert().parent


def container_project_dir() -> Path:
    return _path("SECURE_PROXY_WORK_DIR", "/work")


REPO_CONFIG_RELATIVE = Path(".copilot_here") / "network.json"


# --- the install layout (runtime.install lays it; the container runtime reads it) ---


def prefix_dir() -> Path:
    """Where the runtime is installed: /opt/secure-proxy (venv, config, supervisor files)."""
    return _path("SECURE_PROXY_PREFIX", "/opt/secure-proxy")


def venv_dir() -> Path:
    return prefix_dir() / "venv"


def wrapper_bin_dir() -> Path:
    """Where the installer puts the `secure-proxy-init` and `supervisorctl` wrappers."""
    return Path("/usr/local/bin")


def source_root() -> Path:
    """The directory holding this `runtime` package: a source checkout (with config/,
    supervisor.d/, pyproject.toml beside it) or an installation's site-packages."""
    return Path(__file__).resolve().parent.parent


def sandbox_venv() -> Path:
    """The venv whose interpreter and dependencies the sandbox engine reuses: the one
    this code runs from (a wheel install as well as a checkout's dev venv)."""
    return Path(sys.prefix)


def supervisor_dir() -> Path:
    return _path("SECURE_PROXY_SUPERVISOR_DIR", "/etc/secure-proxy/supervisor")


def supervisor_conf() -> Path:
    return supervisor_dir() / "supervisord.conf"


def supervisor_socket() -> Path:
    return run_dir() / "supervisor.sock"


def component_log_dir() -> Path:
    """Component logs (supervisord, firewall, interceptor, reloader, logguard)."""
    return _path("SECURE_PROXY_COMPONENT_LOG_DIR", "/var/log/secure-proxy")


def component_log(name: str) -> Path:
    return component_log_dir() / f"{name}.log"


def state_dir() -> Path:
    """proxy-user's private state: the mitmproxy confdir with the CA key lives here."""
    return _path("SECURE_PROXY_STATE_DIR", "/var/lib/secure-proxy")


def confdir() -> Path:
    return _path("SECURE_PROXY_CONFDIR", str(state_dir() / "mitmproxy"))


#: mitmproxy's CA files in the confdir: <basename>-ca.pem (key + cert), -ca-cert.pem
CA_BASENAME = "mitmproxy"
CA_CERT_NAME = f"{CA_BASENAME}-ca-cert.pem"
CA_KEY_NAME = f"{CA_BASENAME}-ca.pem"


def session_file() -> Path:
    """What init chose at start (config source, PUID/PGID): read by the reloader and logguard."""
    return run_dir() / "session.json"


def system_ca_file() -> Path:
    """Where the init also drops the CA, so a later update-ca-certificates keeps it."""
    return _path("SECURE_PROXY_SYSTEM_CA", "/usr/local/share/ca-certificates/secure-proxy-ca.crt")


def system_ca_bundle() -> Path:
    return _path("SECURE_PROXY_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")


CONTAINER_HOME = Path("/home/appuser")
CONTAINER_UPSTREAM_CA = Path("/ca/upstream-ca.pem")
APP_USER = "appuser"
