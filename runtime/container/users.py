"""The container's users: the host user's ids, the app user the command runs as, and
proxy-user, the only user whose traffic the firewall lets out directly."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from pathlib import Path

from runtime import paths
from runtime.container.console import SetupFailed

DEFAULT_ID = 1000


def host_ids() -> tuple[int, int]:
    """PUID and PGID as the host CLI passed them (0 stays 0 here: see app_ids)."""

    def read(name: str) -> int:
        raw = os.environ.get(name, "").strip()
        try:
            return int(raw) if raw else DEFAULT_ID
        except ValueError:
            raise SetupFailed(f"{name}={raw!r} is not a number; pass a numeric id") from None

    return read("PUID"), read("PGID")


def proxy_ids() -> tuple[int, int]:
    """proxy-user's uid and gid: the one lookup every component uses."""
    try:
        entry = pwd.getpwnam(paths.PROXY_USER)
    except KeyError:
        raise SetupFailed(
            f"user {paths.PROXY_USER} does not exist; the image's installer creates it "
            "(python3 -m runtime.install)"
        ) from None
    return entry.pw_uid, entry.pw_gid


def app_ids(puid: int, pgid: int, proxy_uid: int) -> tuple[int, int]:
    """The user command never runs as root: id 0 (the CLI run by root) becomes 1000.

    Nor as the proxy user: the firewall lets that uid out directly, so a command
    running with it would bypass the interceptor. That is refused, not remapped,
    so the files the user writes never end up owned by a surprising uid.
    """
    uid, gid = (puid or DEFAULT_ID), (pgid or DEFAULT_ID)
    if uid == proxy_uid:
        raise SetupFailed(
            f"PUID={uid} is the uid of {paths.PROXY_USER}, whose traffic bypasses the "
            "interceptor; run with another PUID (your host user's id, e.g. PUID=$(id -u))"
        )
    return uid, gid


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SetupFailed(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def ensure_appuser(uid: int, gid: int) -> str:
    """appuser with uid:gid, reusing an existing group with that gid and renaming an
    existing user with that uid (the node image ships `node` as 1000)."""
    name = paths.APP_USER
    home = str(paths.CONTAINER_HOME)
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    try:
        grp.getgrgid(gid)
    except KeyError:
        try:
            grp.getgrnam(name)
            _run(["groupmod", "-g", str(gid), name])
        except KeyError:
            _run(["groupadd", "-g", str(gid), name])
    try:
        entry = pwd.getpwnam(name)
        if (entry.pw_uid, entry.pw_gid) != (uid, gid) or entry.pw_dir != home:
            _run(["usermod", "-o", "-u", str(uid), "-g", str(gid), "-d", home, name])
    except KeyError:
        try:
            other = pwd.getpwuid(uid).pw_name
            _run(["usermod", "-l", name, "-g", str(gid), "-d", home, other])
        except KeyError:
            _run(["useradd", "-u", str(uid), "-g", str(gid), "-M", "-d", home, "-s", shell, name])
    home_path = paths.CONTAINER_HOME
    home_path.mkdir(parents=True, exist_ok=True)
    os.chown(home_path, uid, gid)
    for sub in (".copilot", ".cache", ".config"):
        path = home_path / sub
        if not path.exists():
            path.mkdir()
            os.chown(path, uid, gid)
    return name
