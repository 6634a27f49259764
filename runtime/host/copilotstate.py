"""The Copilot CLI's own state between runs: its config, sessions and trusted folders.

A host directory, the one copilot_here uses, mounted at the container user's
~/.copilot (/home/appuser/.copilot):

    $XDG_CONFIG_HOME/copilot-cli-docker      (default ~/.config/copilot-cli-docker)

It is created without following symlinks, mode 0700, and belongs to the uid the
command runs with in the container: yours (PUID); when the CLI runs as root the
container's user is 1000 (runtime.container.users.app_ids) and so is the owner.
A symlink there, or a directory of another uid, is refused with the fix: the
engine would mount whatever it points to.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from runtime import paths
from runtime.host.fileproblems import describe
from runtime.host.hoststate import StateError
from runtime.host.plan import Mount, Plan

DIR_NAME = "copilot-cli-docker"
CONTAINER_DIR = str(paths.CONTAINER_HOME / ".copilot")
#: The container user's id when the host user is root (runtime.container.users).
ROOT_REPLACEMENT = 1000


def host_dir(home: Path, environ: Mapping[str, str]) -> Path:
    xdg = environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else home / ".config"
    return base / DIR_NAME


def attach(p: Plan, home: Path, environ: Mapping[str, str]) -> Path:
    """Mount the directory at ~/.copilot in the plan (created later, by `prepare`)."""
    path = host_dir(home, environ)
    p.mounts.append(Mount(str(path), CONTAINER_DIR))
    return path


def owner_of(p: Plan) -> tuple[int, int]:
    """The uid:gid the command runs with in the container (0 becomes 1000, as there)."""
    uid, gid = int(p.env["PUID"]), int(p.env["PGID"])
    return uid or ROOT_REPLACEMENT, gid or ROOT_REPLACEMENT


def prepare(path: Path, p: Plan) -> Path:
    """Create the directory (its parent as any directory of yours), never through a
    symlink; StateError when it is one, is not a directory or is not the container
    user's."""
    uid, gid = owner_of(p)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(describe(path.parent, exc, "create")) from None
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateError(describe(path, exc, "create")) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise StateError(
                f"{path} is a symlink; the Copilot CLI's state is mounted from there and "
                "copilot_here never follows one. Fix: make it a real directory (or remove it)"
            ) from None
        raise StateError(describe(path, exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"{path} is not a directory; move it away")
        if created and st.st_uid != uid:
            os.fchown(fd, uid, gid)  # root made it for the container's user
        elif st.st_uid != uid:
            raise StateError(
                f"{path} belongs to uid {st.st_uid}, but the container's user is uid {uid} "
                f"and keeps the Copilot CLI's state there. Fix: chown -R {uid}:{gid} {path}"
            )
    finally:
        os.close(fd)
    return path
