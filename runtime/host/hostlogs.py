"""Where the traffic log lives on the host, and the checks before it is mounted at /logs.

The log directory must be out of the agent's reach: the project (mounted at
/work) and the config directories are writable from inside, so a log kept
there can be swapped for a symlink to any host directory (the next run would
mount that directory at /logs and the log guard would take it over), or be
replaced by a forged one between runs. So:

    default       <state root>/logs/<path key of the project>/  (runtime.host.hoststate)
    --logs-dir D  D, if no component of it is a symlink, D is the user's own,
                  every parent is the user's or root's, and D neither lies in
                  nor contains another mount of the container

Both are created when missing, one component at a time, without following
symlinks; a check that fails raises StateError with the path and the fix.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from runtime.host.hoststate import (
    StateError,
    ensure_private_dir,
    path_key,
    state_root,
    user_ids,
)

NEW_DIR_MODE = 0o700


def default_logs_dir(project: Path, home: Path, environ: Mapping[str, str] | None = None) -> Path:
    return state_root(home, environ) / "logs" / path_key(project.resolve())


def logs_source(
    project: Path, home: Path, chosen: Path | None, environ: Mapping[str, str] | None = None
) -> Path:
    """The host directory for /logs. An explicit choice is made absolute, never resolved:
    resolving would follow the very symlinks prepare() must refuse."""
    if chosen is not None:
        return Path(os.path.abspath(chosen))
    return default_logs_dir(project, home, environ)


def prepare(
    source: Path,
    explicit: bool,
    home: Path,
    others: Iterable[tuple[str, str]] = (),
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Create and check the logs directory before a run; `others` are the other mounts
    (host source, container target). Raises StateError."""
    if not explicit:
        try:
            return ensure_private_dir(source, state_root(home, environ))
        except StateError as exc:
            # Only when the leaf itself is what failed: every component above it was
            # checked (no symlink), so the advice cannot point through a planted link.
            leaf = str(exc).startswith(f"{source} belongs to uid")
            why = (_left_by_a_killed_run(source) if leaf else None) or exc
            raise StateError(f"logs directory: {why}") from None
    ensure_chosen_dir(source)
    for other, target in others:
        inside = Path(os.path.abspath(other))
        if source == inside or inside in source.parents or source in inside.parents:
            raise StateError(
                f"--logs-dir {source}: overlaps {inside}, which the container sees at "
                f"{target}; choose a directory outside it (or drop --logs-dir for the default)"
            )
    return source


def _left_by_a_killed_run(path: Path) -> str | None:
    """A real directory of another uid at the very end of our private state tree: what
    a run leaves when it is killed before the init hands /logs back (it is then the
    log guard's). Still refused, with the way to take it back."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    uid, gid = user_ids()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid == uid:
        return None
    return (
        f"{path} belongs to uid {st.st_uid}, not to you (uid {uid}), as a run that was "
        f"killed leaves it; take it back with: sudo chown -R {uid}:{gid} {path}"
    )


def ensure_chosen_dir(path: Path) -> Path:
    """Walk from / to `path` by directory descriptors (O_NOFOLLOW: a symlink anywhere
    fails the open), creating what is missing; each parent must be the user's or
    root's, `path` itself the user's."""
    uid, _ = user_ids()
    path = Path(os.path.abspath(path))
    parts = path.parts[1:]
    if not parts:
        raise StateError("--logs-dir /: choose a directory of its own for the logs")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        current = Path("/")
        for i, part in enumerate(parts):
            current = current / part
            last = i == len(parts) - 1
            try:
                os.mkdir(part, NEW_DIR_MODE, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StateError(
                    f"--logs-dir {path}: cannot create {current}: {exc.strerror}"
                ) from None
            try:
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                # Name what is wrong with it (symlink, not a directory, owner) if we can.
                _check(path, current, os.lstat(part, dir_fd=fd), uid, last)
                raise StateError(
                    f"--logs-dir {path}: cannot open {current}: {exc.strerror}"
                ) from None
            os.close(fd)
            fd = child
            _check(path, current, os.fstat(fd), uid, last)
    finally:
        if fd >= 0:
            os.close(fd)
    return path


def _check(path: Path, component: Path, st: os.stat_result, uid: int, last: bool) -> None:
    where = f"--logs-dir {path}: {component}"
    if stat.S_ISLNK(st.st_mode):
        raise StateError(
            f"{where} is a symlink; pass a path without symlinks (copilot_here never "
            "follows one for the logs)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{where} is not a directory; choose another directory")
    allowed = (uid,) if last else (uid, 0)
    if st.st_uid not in allowed:
        whose = "you" if last else "you or root"
        raise StateError(
            f"{where} belongs to uid {st.st_uid}, not to {whose} (uid {uid}); "
            "choose a directory of your own"
        )
