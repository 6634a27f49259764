"""Signals taken synchronously by the init.

The signals the init forwards, and SIGCHLD, are blocked from the first line of
main (threads started later inherit the mask) and taken with sigtimedwait where
the init chooses: between start-up phases and while it waits for readiness (a
Ctrl-C or SIGTERM then aborts the start-up at a known point, never from inside a
half-done step), and in the main loop, where they are forwarded to the command.
A blocked signal is queued even for PID 1, whose default dispositions the
kernel would otherwise discard. Every child gets an empty mask (`unblock` as its
preexec_fn).
"""

from __future__ import annotations

import signal
import time

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
TAKEN = (*FORWARDED, signal.SIGCHLD)


class Interrupted(BaseException):
    """A forwarded signal arrived before there was a command to forward it to."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def block() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, TAKEN)


def unblock() -> None:
    """In a child before exec: it must see its signals as usual."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def check(wait: float = 0.0) -> None:
    """Raise Interrupted for a forwarded signal that arrived (waiting up to `wait`).

    SIGWINCH is dropped: before the command runs there is nothing to resize.
    """
    deadline = time.monotonic() + wait
    while True:
        info = signal.sigtimedwait(FORWARDED, max(0.0, deadline - time.monotonic()))
        if info is None:
            return
        if info.si_signo != signal.SIGWINCH:
            raise Interrupted(info.si_signo)


def next_signal() -> int:
    """Block until one of TAKEN arrives; its number."""
    return signal.sigwaitinfo(TAKEN).si_signo
