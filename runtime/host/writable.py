"""A run that mounts a config writable is waited for instead of exec'd: at exit the
CLI shows what the agent changed in it (a later run uses that only once approved)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from runtime.host import trust
from runtime.host.plan import RunError
from runtime.resolve import find_config


def watch_writable_config(
    state: Path, project: Path, home: Path, config_write: bool
) -> tuple[str, Path] | None:
    """The config a writable run exposes to the agent, its content recorded as the
    approved one (if not yet), so what the agent changes is shown at exit and needs
    approval before a later run uses it. None when nothing is mounted writable."""
    if not config_write:
        return None
    kind, path = find_config(project, home)
    if path is None:
        return None
    trust.before_writable_run(state, kind, path)
    return kind, path


def report_config_changes(state: Path, watched: tuple[str, Path] | None) -> None:
    if watched is not None:
        print(trust.after_writable_run(state, *watched), end="", file=sys.stderr)


FORWARDED = (signal.SIGTERM, signal.SIGHUP)
TERMINAL = (signal.SIGINT, signal.SIGQUIT)


def wait_for(argv: list[str]) -> int:
    """Run the engine as a child and return its exit code (128+N for signal N), as
    exec would have: SIGTERM/SIGHUP are passed on; SIGINT/SIGQUIT come from the
    terminal, which sends them to the engine too (or, in raw mode, the engine reads
    the keys), so the CLI only survives them to report at exit."""
    child: list[subprocess.Popen[bytes]] = []
    early: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            early.append(signum)

    def survive(_signum: int, _frame: object) -> None:
        # A handler, not SIG_IGN: an ignored signal stays ignored across exec, and
        # the engine must still get the user's Ctrl-C.
        return

    previous = {sig: signal.getsignal(sig) for sig in (*FORWARDED, *TERMINAL)}
    try:
        for sig in FORWARDED:
            signal.signal(sig, forward)
        for sig in TERMINAL:
            signal.signal(sig, survive)
        try:
            proc = subprocess.Popen(argv)
        except OSError as exc:
            raise RunError(f"cannot start {argv[0]}: {exc.strerror}") from None
        child.append(proc)
        for sig in early:
            proc.send_signal(sig)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
