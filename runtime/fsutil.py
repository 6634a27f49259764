"""Atomic file replacement: the one way this project writes a file others read."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write to a temp file beside `path`, then rename over it.

    A reader (the interceptor on SIGHUP, the init waiting for a marker, an
    editor) sees the old file or the new one, never half of one.
    """
    import tempfile  # here: an inactive start imports this module and writes nothing

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
