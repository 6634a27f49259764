"""The init's signals, taken synchronously: a pending one aborts at the next check."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from runtime.container import signals


def _to_this_thread(sig: int) -> None:
    """To this (the blocking) thread: a signal sent to the process could be taken by
    another thread of the test process, which does not block it, and end the run."""
    signal.pthread_kill(threading.get_ident(), sig)


@pytest.fixture
def blocked() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signals.block()
    try:
        yield
    finally:
        for sig in signals.TAKEN:  # nothing left pending for the test process
            while signal.sigtimedwait([sig], 0) is not None:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_nothing_pending_returns(blocked: None) -> None:
    start = time.monotonic()
    signals.check(0.1)
    assert 0.09 <= time.monotonic() - start < 1


def test_a_pending_term_aborts_with_its_number(blocked: None) -> None:
    _to_this_thread(signal.SIGTERM)  # blocked: it waits for us instead of killing
    with pytest.raises(signals.Interrupted) as caught:
        signals.check()
    assert caught.value.signum == signal.SIGTERM


def test_a_window_resize_does_not_abort(blocked: None) -> None:
    _to_this_thread(signal.SIGWINCH)
    signals.check()
    _to_this_thread(signal.SIGINT)
    with pytest.raises(signals.Interrupted) as caught:
        signals.check()
    assert caught.value.signum == signal.SIGINT


def test_a_child_starts_with_an_empty_mask(blocked: None) -> None:
    import subprocess

    out = subprocess.run(
        ["sh", "-c", "grep SigBlk /proc/self/status"],
        preexec_fn=signals.unblock,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["SigBlk:", "0000000000000000"]
