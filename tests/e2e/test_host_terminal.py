"""The host's terminal, end to end (`copilot_here --engine sandbox` in a pseudo-terminal
that stands for the user's): the agent cannot type into it.

A process whose controlling terminal is the host's can push bytes into its input queue
(TIOCSTI; this kernel allows it: dev.tty.legacy_tiocsti), and the host user's shell reads
them as its next command line once copilot_here exits: a command line run on the host,
as the host user (root for the sandbox engine). The agent tries it through its standard
streams (a run on a terminal) and through /dev/tty (a run whose streams are redirected,
started from a terminal). After the run, a reader standing for the host's shell takes
the terminal back (as an interactive shell does when its job ends) and reads what is
queued; the injected command would create a file on the host.
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import signal
import time
from pathlib import Path

import pytest

from tests.harness.sandbox import cli_argv, cli_env, enforce, write_config

pytestmark = pytest.mark.e2e

# Runs as the app user inside the sandbox: TIOCSTI on its stdin, or on /dev/tty.
INJECT = r"""
import fcntl, os, sys, termios
line = sys.argv[2].encode() + b"\n"
try:
    fd = 0 if sys.argv[1] == "stdin" else os.open("/dev/tty", os.O_RDWR)
    for b in line:
        fcntl.ioctl(fd, termios.TIOCSTI, bytes([b]))
    print("INJECT-PUSHED uid=%d" % os.getuid(), flush=True)
except OSError as exc:
    print("INJECT-REFUSED %s" % exc, flush=True)
print("INJECT-END", flush=True)
"""

# The host's shell after the run: the terminal back to its group, then its next line.
READER = r"""
import os, select, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
os.tcsetpgrp(0, os.getpgrp())
ready, _, _ = select.select([0], [], [], 3)
line = os.read(0, 4096) if ready else b""
print("HOST-READ:[%s]" % line.decode(errors="replace").strip(), flush=True)
"""


def in_a_terminal(script: str, cwd: Path, timeout: float = 90) -> str:
    """Run `sh -c script` with a new pseudo-terminal as its controlling terminal (the
    user's terminal) and return everything it showed."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(cwd)
        os.execve("/bin/sh", ["sh", "-c", script], {**cli_env(), "TERM": "xterm"})
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and b"SCRIPT-END" not in out:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return out.decode(errors="replace")


@pytest.mark.parametrize("via", ["stdin", "devtty"])
def test_the_agent_cannot_type_into_the_host_terminal(project: Path, tmp_path: Path, via: str):
    write_config(project, enforce("example.com"))
    (project / "inject.py").write_text(INJECT)
    marker = tmp_path / "typed-by-the-agent"
    reader = tmp_path / "reader.py"
    reader.write_text(READER)
    command = ["python3", "/work/inject.py", via, f"touch {marker}"]
    cli = shlex.join(cli_argv(["--", *command]))
    if via == "devtty":  # no stream is a terminal; the terminal is still the controlling one
        cli += f" </dev/null >{shlex.quote(str(tmp_path / 'out'))} 2>&1"
    script = "; ".join(
        [
            cli,
            "echo CLI-EXITED=$?",
            f"cat {shlex.quote(str(tmp_path / 'out'))} 2>/dev/null",
            f"python3 {shlex.quote(str(reader))}",
            "echo SCRIPT-END",
        ]
    )
    shown = in_a_terminal(script, project)
    assert "CLI-EXITED=0" in shown, shown
    assert "INJECT-END" in shown, shown  # the probe ran to its end
    assert "SCRIPT-END" in shown, shown
    # Whatever the agent managed inside its own terminal, nothing reached the host's.
    assert "HOST-READ:[]" in shown, shown
    assert not marker.exists()
