"""secure-proxy-logguard: keeps the traffic log where the user command cannot touch it.

    /logs               proxy-user 0755
    /logs/traffic.jsonl proxy-user 0644

init calls prepare() before supervisord starts, so the interceptor always finds
both in place. The supervised program then polls every 200 ms (a stat of two
paths: cheap, and unlike inotify it also sees a file replaced or removed) and
repairs any owner or mode change, recording each repair as one JSON line in its
own log. On SIGTERM (supervisord stops it after the interceptor, see the
priorities in supervisor.d/) it hands everything under /logs to PUID:PGID, so
the host user who mounted /logs owns the audit trail after the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import stat
import sys
import time
from pathlib import Path

from runtime import paths

DIR_MODE = 0o755
FILE_MODE = 0o644
POLL_SECONDS = 0.2


def proxy_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(paths.PROXY_USER)
    return entry.pw_uid, entry.pw_gid


def repair_log() -> Path:
    return paths.component_log_dir() / "logguard.jsonl"


def record(event: dict[str, object]) -> None:
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}
    line = json.dumps(event)
    print(line, flush=True)
    try:
        with open(repair_log(), "a") as handle:
            handle.write(line + "\n")
    except OSError:
        pass


def _check(path: Path, kind: str, uid: int, gid: int, mode: int) -> list[dict[str, object]]:
    """Make path what it must be; return the repairs done (empty if it was fine)."""
    repairs: list[dict[str, object]] = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, mode)
            os.close(fd)
        repairs.append({"path": str(path), "repair": "created"})
        st = os.lstat(path)
    wrong_type = stat.S_ISLNK(st.st_mode) or (
        not stat.S_ISDIR(st.st_mode) if kind == "dir" else not stat.S_ISREG(st.st_mode)
    )
    if wrong_type:
        # Never follow a symlink planted in place of the log.
        if kind == "file":
            os.unlink(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, mode)
            os.close(fd)
            repairs.append({"path": str(path), "repair": "replaced non-regular file"})
            st = os.lstat(path)
        else:
            raise RuntimeError(f"{path} is not a directory")
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
        repairs.append(
            {
                "path": str(path),
                "repair": "owner",
                "was": f"{st.st_uid}:{st.st_gid}",
                "now": f"{uid}:{gid}",
            }
        )
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
        repairs.append(
            {
                "path": str(path),
                "repair": "mode",
                "was": oct(stat.S_IMODE(st.st_mode)),
                "now": oct(mode),
            }
        )
    return repairs


def check_once(uid: int, gid: int) -> list[dict[str, object]]:
    repairs = _check(paths.logs_dir(), "dir", uid, gid, DIR_MODE)
    repairs += _check(paths.traffic_log(), "file", uid, gid, FILE_MODE)
    return repairs


def prepare() -> None:
    """Create /logs and the traffic log before the interceptor starts (called by init)."""
    uid, gid = proxy_ids()
    check_once(uid, gid)


def session_ids() -> tuple[int, int]:
    """PUID:PGID as the host user gave them (0 stays 0: a root host user owns its logs)."""
    try:
        data = json.loads(paths.session_file().read_text())
        return int(data["puid"]), int(data["pgid"])
    except (OSError, ValueError, KeyError):
        return int(os.environ.get("PUID", "1000")), int(os.environ.get("PGID", "1000"))


def hand_over() -> int:
    """Give everything under /logs (and /logs itself) to PUID:PGID. Returns files changed."""
    uid, gid = session_ids()
    root = paths.logs_dir()
    changed = 0
    if not root.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
                changed += 1
    with contextlib.suppress(OSError):
        os.chown(root, uid, gid)
    return changed


def main(argv: list[str] | None = None) -> int:
    uid, gid = proxy_ids()
    stopping = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    record({"event": "start", "logs": str(paths.logs_dir()), "owner": f"{uid}:{gid}"})
    while not stopping:
        try:
            for repair in check_once(uid, gid):
                record({"event": "repair", **repair})
        except OSError as exc:
            record({"event": "error", "error": str(exc)})
        time.sleep(POLL_SECONDS)
    changed = hand_over()
    puid, pgid = session_ids()
    record({"event": "handover", "owner": f"{puid}:{pgid}", "entries": changed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
