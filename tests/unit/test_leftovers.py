"""The init's end of a run: which processes must go before the hand-over, and that they go.

Here the test process is not PID 1, so only its own descendants are in scope
(the init's rule outside a PID namespace of its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from runtime.container import leftovers

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def test_not_pid_1_means_descendants_only() -> None:
    assert leftovers.whole_namespace() is False
    assert 1 not in leftovers.leftovers(None, None)


def test_a_kept_tree_is_spared_unless_it_runs_as_the_app_user() -> None:
    kept = subprocess.Popen(["sleep", "30"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        left = leftovers.leftovers(kept.pid, None)
        assert other.pid in left and kept.pid not in left
        assert kept.pid in leftovers.leftovers(kept.pid, os.getuid())  # same uid: not spared
    finally:
        for p in (kept, other):
            p.kill()
            p.wait()


def test_term_then_kill_until_none_is_left() -> None:
    polite = subprocess.Popen(["sleep", "30"])
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_TERM])
    time.sleep(0.3)  # the handler is installed
    reaped: dict[int, int] = {}
    start = time.monotonic()
    assert leftovers.end_processes(None, None, reaped, grace=0.5)
    took = time.monotonic() - start
    assert 0.5 <= took < 3, took
    signals = {pid: os.WTERMSIG(status) for pid, status in reaped.items()}
    assert signals[polite.pid] == signal.SIGTERM
    assert signals[stubborn.pid] == signal.SIGKILL
    assert leftovers.leftovers(None, None) == {}
