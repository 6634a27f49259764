"""The user command: what runs, with which environment, and how it owns the terminal.

It runs as the app user with no_new_privs and an empty capability bounding set,
in its own process group, in the terminal's foreground when there is one: Ctrl-C
and window resizes go to it, not to the init or supervisord.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from runtime import paths
from runtime.container.console import SetupFailed
from runtime.container.signals import FORWARDED


def default_command() -> list[str]:
    import shutil  # only without a command given; an inactive start stays a few imports

    if shutil.which("copilot"):
        return ["copilot"]
    return ["/bin/bash"] if Path("/bin/bash").exists() else ["/bin/sh"]


def user_env(name: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_PROXY_")}
    env.update(
        HOME=str(paths.CONTAINER_HOME),
        USER=name,
        LOGNAME=name,
        PWD=str(paths.container_project_dir()),
    )
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra)
    return env


def launch(command: list[str], uid: int, gid: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    tty = os.isatty(0)
    argv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        # Its own group only: PUID's user may be a real one of the host's /etc/group
        # (the sandbox engine's overlay), whose groups (disk, docker, ...) it must not get.
        "--clear-groups",
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--",
        *command,
    ]
    workdir = paths.container_project_dir()
    if not workdir.is_dir():
        workdir = paths.CONTAINER_HOME

    def preexec() -> None:
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.setpgid(0, 0)
        if tty:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(0, os.getpgrp())
        # Dispositions as a shell's child expects them (SIG_IGN survives exec), and
        # the mask empty (the init blocks the signals it takes).
        for sig in (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    try:
        return subprocess.Popen(argv, env=env, cwd=workdir, preexec_fn=preexec)
    except FileNotFoundError as exc:
        raise SetupFailed(f"cannot start the command: {exc}") from None


def reclaim_terminal() -> None:
    """The terminal back to the init's group once the command is gone."""
    if not os.isatty(0):
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(0, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, old)


def exit_code(status: int) -> int:
    """The command's wait status as a shell reports it: 128+N when signal N killed it."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
