"""secure-proxy-logguard: keeps the traffic log where the user command cannot touch it.

    /logs               proxy-user 0755
    /logs/traffic.jsonl proxy-user 0644

init calls prepare() before the services' go (its `prepared` marker), so the
interceptor always finds both in place. The supervised program then polls every
200 ms (a stat of two paths: cheap, and unlike inotify it also sees a file replaced
or removed) and repairs any owner or mode change, recording each repair as one
JSON line in its own log. Ownership and mode are set through a descriptor opened
without following symlinks.

At exit, init (not this program) calls hand_over(): /logs and the log go to
PUID:PGID, so the host user who mounted /logs owns the audit trail after the
session. It runs only after init has killed every process of the user command
and stopped supervisord (this program included), and it touches those two
files only, by descriptor.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

from runtime import paths
from runtime.container.console import SetupFailed
from runtime.container.session import Session, SessionError
from runtime.container.users import proxy_ids

DIR_MODE = 0o755
FILE_MODE = 0o644
POLL_SECONDS = 0.2


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


_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _create(path: Path, kind: str, mode: int) -> None:
    if kind == "dir":
        os.mkdir(path, mode)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        os.close(fd)


def _open(path: Path, kind: str) -> int:
    """A descriptor of path itself (never a symlink's target): what gets chowned/chmodded."""
    return os.open(path, _FLAGS | (os.O_DIRECTORY if kind == "dir" else 0))


def _check(path: Path, kind: str, uid: int, gid: int, mode: int) -> list[dict[str, object]]:
    """Make path what it must be; return the repairs done (empty if it was fine)."""
    repairs: list[dict[str, object]] = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _create(path, kind, mode)
        repairs.append({"path": str(path), "repair": "created"})
        st = os.lstat(path)
    wrong_type = stat.S_ISLNK(st.st_mode) or (
        not stat.S_ISDIR(st.st_mode) if kind == "dir" else not stat.S_ISREG(st.st_mode)
    )
    if wrong_type:
        # Never follow a symlink planted in place of the log.
        if kind == "file":
            os.unlink(path)
            _create(path, kind, mode)
            repairs.append({"path": str(path), "repair": "replaced non-regular file"})
        else:
            raise RuntimeError(f"{path} is not a directory")
    fd = _open(path, kind)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISDIR if kind == "dir" else stat.S_ISREG)(st.st_mode):
            raise OSError(f"{path} changed type while being checked")  # next poll repairs
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
            repairs.append(
                {
                    "path": str(path),
                    "repair": "owner",
                    "was": f"{st.st_uid}:{st.st_gid}",
                    "now": f"{uid}:{gid}",
                }
            )
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
            repairs.append(
                {
                    "path": str(path),
                    "repair": "mode",
                    "was": oct(stat.S_IMODE(st.st_mode)),
                    "now": oct(mode),
                }
            )
    except OSError as exc:
        if exc.errno is None or exc.filename is not None:
            raise
        # fchown/fchmod name no file: say which (the init's start-up error shows it).
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
    return repairs


def check_once(uid: int, gid: int) -> list[dict[str, object]]:
    repairs = _check(paths.logs_dir(), "dir", uid, gid, DIR_MODE)
    repairs += _check(paths.traffic_log(), "file", uid, gid, FILE_MODE)
    return repairs


def check_log_place(host_dir: str | None = None) -> None:
    """Before /logs changes at all (called by init): what is at the traffic log's place
    must be something prepare() may take and hand_over() give back. A regular file with
    one link is the log; a symlink, FIFO, ... is replaced (_check); a directory cannot be,
    and a file with other links would take them along to proxy-user's uid. Either would
    leave /logs proxy-user's after the run (hand_over refuses it), so the next run
    refused. SetupFailed naming it, `host_dir` the host's logs directory."""
    log = paths.traffic_log()
    try:
        st = os.lstat(log)
    except FileNotFoundError:
        return
    where = f" (on the host: {host_dir.rstrip('/')}/{log.name})" if host_dir else ""
    if stat.S_ISDIR(st.st_mode):
        what = "is a directory"
    elif stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        what = f"has {st.st_nlink} hard links"
    else:
        return
    raise SetupFailed(
        f"{log}{where} {what}, not a traffic log the runtime can take: move it out of "
        "the logs directory and start again (nothing there was changed)"
    )


def prepare() -> None:
    """Create /logs and the traffic log before the interceptor starts (called by init,
    after check_log_place)."""
    uid, gid = proxy_ids()
    check_once(uid, gid)


class HandOverError(Exception):
    """The logs directory or the log is not what the runtime made; nothing was handed over."""


def hand_over() -> list[str]:
    """Give /logs and /logs/traffic.jsonl, the only files the runtime makes there, to
    PUID:PGID (from the session file). Returns the paths handed over.

    Called by init once every process of the user command is gone and supervisord
    has stopped: nothing can write to /logs any more. By descriptor, never by path
    and never recursively: each is opened without following symlinks (O_NOFOLLOW,
    O_NONBLOCK so a FIFO cannot block us), checked with fstat to be the directory /
    single-link regular file it must be, and fchown'd. Anything else found in /logs
    keeps its owner.
    """
    try:
        session = Session.read()
    except SessionError as exc:
        raise HandOverError(f"{exc}; the logs keep their owner") from None
    uid, gid = session.puid, session.pgid
    root = paths.logs_dir()
    done: list[str] = []
    try:
        dir_fd = os.open(root, _FLAGS | os.O_DIRECTORY)
    except OSError as exc:
        raise HandOverError(f"{root}: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(dir_fd).st_mode):
            raise HandOverError(f"{root} is not a directory")
        log = paths.traffic_log()
        if log.parent == root:
            try:
                fd = os.open(log.name, _FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                fd = -1
            except OSError as exc:
                raise HandOverError(f"{log}: {exc.strerror} (a symlink?)") from None
            if fd >= 0:
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                        raise HandOverError(f"{log} is not a regular file with one link")
                    os.fchown(fd, uid, gid)
                    done.append(str(log))
                finally:
                    os.close(fd)
        os.fchown(dir_fd, uid, gid)
        done.append(str(root))
    finally:
        os.close(dir_fd)
    return done


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
    # No hand-over here: init does it, once every process of the command is gone
    # (a hand-over at this point would give the log to a uid that may still run).
    record({"event": "stop"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
