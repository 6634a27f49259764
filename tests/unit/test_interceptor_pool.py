"""The interceptor's pool (interceptor/pool.py): real forked workers, real signals.

The pool runs in a child Python (it blocks signals and forks: never in pytest's own
process) with a small stand-in for a worker that records what it sees.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.container.interceptor import pool

REPO = Path(__file__).resolve().parents[2]

WORKER = r"""
import os, signal, sys, time
from pathlib import Path
from runtime.container.interceptor import pool

out, mode, workers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def serve(n):
    if mode == "crash" or (mode == "late-crash" and n == 1 and (out / "crash").exists()):
        return 3
    if mode == "ready-then-die" and n == 0 and not (out / "died").exists():
        # Stop the pool so that it finds READY and SIGCHLD pending together.
        os.kill(os.getppid(), signal.SIGSTOP)
        pool.announce_ready()
        (out / "died").touch()
        return 3
    def note(signum, _frame):
        with open(out / f"signals-{n}", "a") as f:
            f.write(signal.Signals(signum).name + "\n")
        if signum == signal.SIGTERM:
            sys.exit(0)
    signal.signal(signal.SIGHUP, note)
    signal.signal(signal.SIGTERM, note)
    (out / f"started-{n}").touch()
    while mode == "slow" and not (out / "go").exists():
        time.sleep(0.02)
    pool.announce_ready()
    tmp = out / f".pid-{n}"
    tmp.write_text(f"{os.getpid()}\n")
    tmp.rename(out / f"pid-{n}")
    while True:
        time.sleep(1)

pool.FIRST_PAUSE = 0.05
sys.exit(pool.run(workers, serve))
"""


def wait_for(check: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {check}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Run:
    def __init__(self, tmp: Path, mode: str, workers: int) -> None:
        self.out = tmp
        script = tmp / "pool_probe.py"
        script.write_text(WORKER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp), mode, str(workers)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )

    def worker_pid(self, n: int, not_: int | None = None) -> int:
        def read() -> int | None:
            try:
                pid = int((self.out / f"pid-{n}").read_text())
            except (OSError, ValueError):
                return None
            return pid if pid != not_ else None

        return int(wait_for(read))  # type: ignore[arg-type]

    def signals(self, n: int) -> list[str]:
        path = self.out / f"signals-{n}"
        return path.read_text().split() if path.exists() else []


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(mode: str = "serve", workers: int = 2) -> Run:
        runs.append(Run(tmp_path, mode, workers))
        return runs[-1]

    yield start
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(5)
        for n in range(4):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((tmp_path / f"pid-{n}").read_text()), signal.SIGKILL)


def test_forks_each_worker_named_with_an_open_signal_mask(run):
    r = run(workers=3)
    for n in range(3):
        pid = r.worker_pid(n)
        status = Path(f"/proc/{pid}/status").read_text()
        assert Path(f"/proc/{pid}/comm").read_text().strip() == pool.worker_comm(n)
        assert f"PPid:\t{r.proc.pid}\n" in status
        # The pool takes its signals blocked; a worker must see its own as usual.
        assert "SigBlk:\t0000000000000000\n" in status


def test_a_dead_worker_is_forked_again_and_the_others_keep_running(run):
    r = run()
    first, other = r.worker_pid(1), r.worker_pid(0)
    os.kill(first, signal.SIGKILL)
    again = r.worker_pid(1, not_=first)
    assert again != first and alive(again)
    assert r.worker_pid(0) == other and alive(other)
    assert r.proc.poll() is None


def test_sighup_reaches_every_worker(run):
    r = run()
    pids = [r.worker_pid(n) for n in range(2)]
    r.proc.send_signal(signal.SIGHUP)
    for n in range(2):
        wait_for(lambda n=n: r.signals(n) == ["SIGHUP"])
    assert [r.worker_pid(n) for n in range(2)] == pids and r.proc.poll() is None


def test_sighup_to_a_worker_still_starting_waits_until_it_is_ready(run, tmp_path):
    """Before then it may not handle SIGHUP (the default action kills it) and may
    have read the policy before the edit: it gets the reload once it is ready."""
    r = run(mode="slow")
    for n in range(2):
        wait_for(lambda n=n: (tmp_path / f"started-{n}").exists())
    r.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert [r.signals(n) for n in range(2)] == [[], []]
    (tmp_path / "go").touch()
    for n in range(2):
        wait_for(lambda n=n: r.signals(n) == ["SIGHUP"])
    time.sleep(0.2)
    assert [r.signals(n) for n in range(2)] == [["SIGHUP"], ["SIGHUP"]]  # once each
    assert r.proc.poll() is None


def test_sigterm_stops_every_worker_then_the_pool(run):
    r = run()
    pids = [r.worker_pid(n) for n in range(2)]
    r.proc.send_signal(signal.SIGTERM)
    assert r.proc.wait(10) == 0
    assert [r.signals(n) for n in range(2)] == [["SIGTERM"], ["SIGTERM"]]
    assert not any(alive(p) for p in pids)


def test_a_killed_pool_takes_its_workers_with_it(run):
    """Else they would hold the ports the pool's restart must listen on."""
    r = run()
    pids = [r.worker_pid(n) for n in range(2)]
    r.proc.kill()
    r.proc.wait(5)
    wait_for(lambda: not any(alive(p) for p in pids))
    assert [r.signals(n) for n in range(2)] == [["SIGTERM"], ["SIGTERM"]]


def test_a_worker_that_was_ready_and_died_is_forked_again(run, tmp_path):
    """READY and SIGCHLD pending at once (sigwaitinfo gives SIGCHLD first): it was
    ready, so it is a crash to recover from, not a failed start."""
    r = run(mode="ready-then-die")
    wait_for(lambda: (tmp_path / "died").exists())
    wait_for(lambda: Path(f"/proc/{r.proc.pid}/stat").read_text().split(") ")[1][0] == "T")
    # The worker has exited (a zombie: its stopped pool cannot reap it), so SIGCHLD is
    # pending beside READY.
    wait_for(lambda: any(not alive(int(p)) for p in _children(r.proc.pid)))
    os.kill(r.proc.pid, signal.SIGCONT)
    assert r.worker_pid(0) and r.worker_pid(1)
    assert r.proc.poll() is None, r.proc.stderr.read() if r.proc.stderr else ""


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


def test_a_worker_that_dies_while_starting_fails_the_start_at_once(run):
    """supervisord then sees a start that failed (BACKOFF), as for one process."""
    r = run(mode="crash", workers=2)
    assert r.proc.wait(15) == 1
    err = r.proc.stderr.read() if r.proc.stderr else ""
    assert "exited 3 while starting" in err and "forking it again" not in err, err


def test_a_worker_that_keeps_dying_ends_the_pool_with_exit_1(run, tmp_path):
    r = run(mode="late-crash", workers=2)
    first = r.worker_pid(1)
    (tmp_path / "crash").touch()
    os.kill(first, signal.SIGKILL)
    assert r.proc.wait(15) == 1
    err = r.proc.stderr.read() if r.proc.stderr else ""
    assert err.count("forking it again") == pool.GIVE_UP - 1, err
    assert f"died {pool.GIVE_UP} times" in err and "exited 3" in err, err
