"""The sandbox's terminal: a pseudo-terminal of its own, never the host's.

A process that holds a terminal as its controlling terminal can push bytes into that
terminal's input queue (TIOCSTI, still allowed on most kernels: dev.tty.legacy_tiocsti),
and whatever reads the terminal next takes them for typed input. Were the command given
the host's terminal, the agent would type a command line into it and the host user's
shell (root, for the sandbox engine) would run it as soon as copilot_here exits.

So, as `docker run -t` does, the sandbox gets a new pseudo-terminal whenever one of the
host's standard streams is a terminal: its slave becomes the sandbox's controlling
terminal (in a session of its own) and every standard stream that was a terminal; the
host side copies bytes between the host's terminal (in raw mode meanwhile, so Ctrl-C
reaches the command as a byte, through the slave's line discipline) and the master, and
passes window-size changes on. No process in the sandbox holds the host's terminal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import termios
import threading
import tty
from types import FrameType

from loguru import logger

STREAMS = (0, 1, 2)
CHUNK = 65536


def host_terminals() -> list[int]:
    """The standard streams of this process that are terminals."""
    return [fd for fd in STREAMS if os.isatty(fd)]


def _winsize(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    except OSError:
        return None


class Relay:
    """A pseudo-terminal for the sandbox and the thread that copies between it and the
    host's terminal. Use: `stdio()` for the child's streams, `session_leader` as its
    preexec_fn, `start()` after it started, `close()` once it ended."""

    def __init__(self, terminals: list[int]) -> None:
        self.terminals = terminals
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.master, False)
        # Input from the host's terminal when stdin is one; output to the first of
        # stdout/stderr that is one (the slave carries both, as with `docker run -t`).
        self.input = 0 if 0 in terminals else None
        self.output = next((fd for fd in (1, 2) if fd in terminals), terminals[0])
        host = self.input if self.input is not None else self.output
        self.host_fd = host
        self._saved: list[object] | None = None
        size = _winsize(host)
        if size is not None:
            fcntl.ioctl(self.slave, termios.TIOCSWINSZ, size)
        with contextlib.suppress(termios.error):
            # The slave starts as the host's terminal was (echo, line editing, signals).
            termios.tcsetattr(self.slave, termios.TCSANOW, termios.tcgetattr(host))
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._copy, name="sandbox-pty", daemon=True)
        self._previous_winch: object = None

    def stdio(self) -> dict[str, int | None]:
        """Popen's stdin/stdout/stderr: the slave for each stream that is a terminal."""
        pick = {fd: (self.slave if fd in self.terminals else None) for fd in STREAMS}
        return {"stdin": pick[0], "stdout": pick[1], "stderr": pick[2]}

    def session_leader(self) -> None:
        """preexec_fn of the child: a new session whose controlling terminal is the
        slave (the host's terminal stays the controlling terminal of the host's session
        only, and no fd of it is inherited)."""
        os.setsid()
        fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)

    def start(self) -> None:
        os.close(self.slave)
        self.slave = -1
        if self.input is not None:
            with contextlib.suppress(termios.error):
                self._saved = termios.tcgetattr(self.input)
                tty.setraw(self.input, termios.TCSANOW)
        if threading.current_thread() is threading.main_thread():
            self._previous_winch = signal.signal(signal.SIGWINCH, self._winch)
        self._thread.start()

    def _winch(self, _signum: int, _frame: FrameType | None) -> None:
        size = _winsize(self.host_fd)
        if size is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def _copy(self) -> None:
        pending = b""
        os.set_blocking(self.master, False)
        while True:
            readers = [self.master, self._stop_r]
            if self.input is not None and not pending:
                readers.append(self.input)
            writers = [self.master] if pending else []
            try:
                ready, writable, _ = select.select(readers, writers, [])
            except InterruptedError:
                continue
            if self.master in ready and not self._drain_once():
                return
            if self._stop_r in ready:
                while self._drain_once(block=False):
                    pass
                return
            if self.input is not None and self.input in ready:
                try:
                    data = os.read(self.input, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    self.input = None  # the host's terminal is gone: send nothing more
                pending += data
            if writable and pending:
                try:
                    pending = pending[os.write(self.master, pending) :]
                except BlockingIOError:
                    pass
                except OSError:
                    pending = b""

    def _drain_once(self, block: bool = True) -> bool:
        """Copy what the master has to the host's terminal; False once it has no more
        (EIO: every slave descriptor is closed)."""
        try:
            data = os.read(self.master, CHUNK)
        except BlockingIOError:
            return block
        except OSError as exc:
            if exc.errno != errno.EIO:
                logger.debug("sandbox terminal: {}", exc)
            return False
        if not data:
            return False
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.output, view) :]
            except BlockingIOError:
                select.select([], [self.output], [])
            except OSError:
                return False
        return True

    def close(self) -> None:
        """After the sandbox ended: copy what is left, restore the host's terminal."""
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
        if self._previous_winch is not None:
            signal.signal(signal.SIGWINCH, self._previous_winch)  # type: ignore[arg-type]
        if self._saved is not None and self.host_fd is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.host_fd, termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]
        for fd in (self.master, self.slave, self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
