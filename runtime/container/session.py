"""The session file: what the init chose at start, for the services that come after.

The init writes it once, before supervisord starts; the reloader reads the config
source from it (the source stays the same for the whole session) and the init's
hand-over reads PUID:PGID from it. One reader for all of them, and no fall-back:
a missing or malformed file is an error that names the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from runtime import fsutil, paths


def read_only(directory: Path) -> bool:
    """Whether the config's directory is mounted read-only (the default; writable
    with --network-config-write): the init and the reloader decide by this."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class SessionError(Exception):
    """The session file is missing or not one the init wrote."""


@dataclass(frozen=True)
class Session:
    config_kind: str  # runtime.resolve REPO, GLOBAL or BUILT_IN
    config_path: Path | None
    config_sha256: str | None  # of the file the init compiled, None without a file
    puid: int  # as the host user gave them (0 stays 0: a root host user owns its logs)
    pgid: int
    app_uid: int  # what the command runs with
    app_gid: int
    workers: int = 1  # interceptor processes (the config's "workers", resolved at start)

    def write(self, path: Path | None = None) -> Path:
        data = asdict(self)
        data["config_path"] = str(self.config_path) if self.config_path else None
        return fsutil.atomic_write(path or paths.session_file(), json.dumps(data) + "\n", 0o644)

    @classmethod
    def read(cls, path: Path | None = None) -> Session:
        path = path or paths.session_file()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SessionError(f"cannot read {path}: {exc}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise SessionError(f"{path} is not a session file the init wrote (keys: {names})")
        try:
            return cls(
                config_kind=str(data["config_kind"]),
                config_path=Path(data["config_path"]) if data["config_path"] else None,
                config_sha256=str(data["config_sha256"]) if data["config_sha256"] else None,
                **{
                    k: _int(path, k, data[k])
                    for k in ("puid", "pgid", "app_uid", "app_gid", "workers")
                },
            )
        except (TypeError, ValueError) as exc:
            raise SessionError(f"{path}: {exc}") from None


def _int(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SessionError(f"{path}: {key} must be an integer, not {value!r}")
    return value
