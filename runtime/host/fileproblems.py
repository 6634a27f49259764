"""One line for every file problem the host CLI can meet: the file, what is wrong
with it, and the fix. Never a traceback (the CLI exits 1 with this line)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class FileProblem(Exception):
    """A file or directory the CLI cannot use; str() is the one line to print."""


def _first_non_directory(path: Path) -> Path | None:
    """The component of `path` that exists but is not a directory (ENOTDIR's culprit)."""
    for parent in reversed(path.parents):
        if os.path.lexists(parent) and not parent.is_dir():
            return parent
    return None


def describe(path: Path | str | None, exc: OSError, action: str = "read") -> str:
    """`action`: read, write or create. The fix follows from errno."""
    path = Path(path if path is not None else (exc.filename or "?"))
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        want = "readable" if action == "read" else "writable"
        target = path if action == "read" or path.exists() else path.parent
        return (
            f"{path}: permission denied ({action}). Fix: make {target} {want} by you "
            f"(ls -ld {target}; chmod u+{'r' if action == 'read' else 'w'} or chown), "
            "or run as its owner"
        )
    if code == errno.EROFS:
        return (
            f"{path}: read-only file system (cannot {action} it). Fix: run from a writable "
            "directory, or remount it read-write"
        )
    if code == errno.EISDIR:
        return f"{path} is a directory, not a file. Fix: move that directory away"
    if code in (errno.ENOTDIR, errno.EEXIST):
        culprit = _first_non_directory(path)
        if culprit is not None:
            return (
                f"{culprit} is a file, but a directory belongs there (for {path}). "
                f"Fix: move {culprit} away"
            )
    if code == errno.ENOENT:
        return f"{path}: no such file or directory. Fix: check the path (and its symlinks)"
    if code == errno.ELOOP:
        return f"{path}: too many levels of symlinks. Fix: replace the link loop with a file"
    if code == errno.ENOSPC:
        return f"{path}: no space left on the device. Fix: free some space"
    return f"cannot {action} {path}: {exc.strerror or exc}. Fix: check the path and its permissions"


def problem(path: Path | str | None, exc: OSError, action: str = "read") -> FileProblem:
    return FileProblem(describe(path, exc, action))
