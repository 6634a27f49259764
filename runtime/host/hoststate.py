"""The host CLI's own state: approvals of repo configs and the traffic logs.

It lives outside anything a container sees. `~/.copilot_here/` is the global
config's directory, which is mounted into containers (writable with
`--network-config-write`), and the project is mounted at /work: neither may
hold what decides the next run. So the state goes to the XDG state directory,
`$XDG_STATE_HOME/copilot_here` (default `~/.local/state/copilot_here`):

    approvals/<key>.json      one approved repo (or global) config: path, sha256, content
    logs/<project key>/       the traffic log directory of one project, mounted at /logs

Every directory below the state root is created and opened without following
symlinks and must belong to the user running the CLI: a planted link or a
directory of somebody else's is refused, never written through.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from runtime.host.fileproblems import describe


class StateError(Exception):
    """A host state directory that is unsafe to use; the message names it and the fix."""


UNSUPPORTED_HOST = (
    "copilot_here needs a POSIX host: the container's user gets your uid and gid, and its "
    "state is kept private by owner (os.getuid is missing here, as on Windows). Fix: run "
    "it inside WSL 2, or on Linux or macOS"
)


def user_ids() -> tuple[int, int]:
    """The user's uid and gid; StateError with the fix where the OS has none (Windows)."""
    getuid = getattr(os, "getuid", None)
    getgid = getattr(os, "getgid", None)
    if getuid is None or getgid is None:
        raise StateError(UNSUPPORTED_HOST)
    return getuid(), getgid()


def state_root(home: Path, environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else home / ".local" / "state"
    return base / "copilot_here"


def path_key(path: Path) -> str:
    """A directory name for an absolute path: readable tail + hash of the whole."""
    text = str(path)
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", path.name or "root")[:40]
    return f"{tail}-{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


def _check_dir(path: Path, st: os.stat_result, uid: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{path} is a symlink; remove it (copilot_here never follows one here)")
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{path} is not a directory; move it away")
    if st.st_uid != uid:
        raise StateError(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {uid}); remove it or "
            "choose another directory"
        )


def ensure_private_dir(path: Path, below: Path, mode: int = 0o700) -> Path:
    """Create `path` (and its parents from `below` down) without following symlinks.

    `below` itself must exist or be creatable as a plain directory; every
    component from it to `path` must be a real directory owned by this user.
    Returns `path`. Raises StateError naming the offending component.
    """
    uid, _ = user_ids()
    path = Path(os.path.abspath(path))
    below = Path(os.path.abspath(below))
    if path != below and below not in path.parents:
        raise StateError(f"{path} is not below {below}")
    try:
        below.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(describe(below.parent, exc, "create")) from None
    parts = [below, *[below / rel for rel in _steps(path.relative_to(below))]]
    for component in parts:
        try:
            os.mkdir(component, mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(describe(component, exc, "create")) from None
        _check_dir(component, os.lstat(component), uid)
    # The last one again by descriptor, so a swap after the lstat is seen too.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StateError(describe(path, exc)) from None
    try:
        _check_dir(path, os.fstat(fd), uid)
    finally:
        os.close(fd)
    return path


def _steps(relative: Path) -> list[Path]:
    out: list[Path] = []
    current = Path()
    for part in relative.parts:
        current = current / part
        out.append(current)
    return out
