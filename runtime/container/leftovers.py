"""The init as a reaper: zombies while the command runs, every leftover at the end.

When the command exits, every process it left behind must end before the
traffic log is handed to the uid the command ran with (nothing of the command
may still be there to write to it). In scope: every process of the PID
namespace when the init is its PID 1, else the init's own descendants (it is
their subreaper); spared: supervisord's tree, unless a process in it runs with
the app user's uid. SIGTERM, a short grace, SIGKILL, until none remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from runtime.container.console import trace

KILL_GRACE = float(os.environ.get("SECURE_PROXY_KILL_GRACE", "1.0"))
KILL_TIMEOUT = 5.0
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> None:
    """Not PID 1 (e.g. under another init): orphans of the command still come to us."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_zombies(reaped: dict[int, int]) -> None:
    """Collect every exited child (pid -> wait status) without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reaped[pid] = status


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) from /proc/<pid>/stat, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


def _uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of pid."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return {int(x) for x in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def whole_namespace() -> bool:
    """True when the init is PID 1 of its PID namespace and /proc shows that namespace:
    then every other process in /proc is the container's. Otherwise (docker --init,
    a shared PID namespace) only the init's own descendants are."""
    try:
        return os.getpid() == 1 and os.readlink("/proc/self") == "1"
    except OSError:
        return False


def leftovers(keep_root: int | None, app_uid: int | None) -> dict[int, str]:
    """pid -> start time of every live process that must end before the hand-over:
    all but the init and the tree of keep_root (supervisord), plus any process in that
    tree running with the app user's uid (real, effective or saved)."""
    me = os.getpid()
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None:
                table[int(entry)] = info
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _start) in table.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root: int) -> set[int]:
        found, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    keep = tree(keep_root) if keep_root is not None else set()
    scope = set(table) if whole_namespace() else tree(me)
    out: dict[int, str] = {}
    for pid in scope - {me}:
        _ppid, state, start = table[pid]
        if state in ("Z", "X"):
            continue  # dead already; reaped by whoever waits for it (the init, in the end)
        if pid not in keep or (app_uid is not None and app_uid in _uids(pid)):
            out[pid] = start
    return out


def _send(pid: int, start: str, sig: int) -> None:
    """Signal pid only if it is still the process we listed (a pidfd pins it)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        info = _proc_stat(pid)
        if info is not None and info[2] == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return
    try:
        info = _proc_stat(pid)
        if info is not None and info[2] == start:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def end_processes(
    keep_root: int | None, app_uid: int | None, reaped: dict[int, int], grace: float
) -> bool:
    """SIGTERM every leftover, SIGKILL what is still there after `grace`, until none
    remains (new ones included: a process forking while we scan is caught next round).
    Returns False if some were still alive after KILL_TIMEOUT (stuck in the kernel)."""
    start = time.monotonic()
    termed: set[tuple[int, str]] = set()
    while True:
        reap_zombies(reaped)
        left = leftovers(keep_root, app_uid)
        if not left:
            return True
        elapsed = time.monotonic() - start
        if elapsed > grace + KILL_TIMEOUT:
            trace(f"still running after SIGKILL: {sorted(left)}")
            return False
        for pid, started in left.items():
            if elapsed >= grace:
                _send(pid, started, signal.SIGKILL)
            elif (pid, started) not in termed:
                _send(pid, started, signal.SIGTERM)
                termed.add((pid, started))
        time.sleep(0.02)
