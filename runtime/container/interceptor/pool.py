"""The interceptor's workers: mitmproxy is imported once, then forked N times.

Importing mitmproxy's proxy layers is most of an interceptor's start (~0.3 s of
CPU here), and the container starts all its services at once on few cores. So one
supervised process (`secure-proxy-interceptor --workers N`) imports, then forks
worker 0 .. N-1; each worker builds its own mitmproxy master, listens on its own
port and writes its own readiness marker. The forked workers share the imported
pages (copy on write; launch.py froze them out of the collector).

This process, the pool, only supervises its workers, with signals taken
synchronously (sigwaitinfo, as the init does):

- a worker of the first generation that dies before it said it is ready
  (`announce_ready`, once it listens; a port taken, a broken policy) makes the pool
  stop all and exit 1 at once, so supervisord sees a start that failed (BACKOFF,
  then FATAL) as it did for one process, and whoever waits for the workers learns it
  without waiting;
- any other worker that dies is forked again, after a short pause that grows while it
  keeps dying; one that dies GIVE_UP times within CRASH_WINDOW makes the pool stop
  all and exit 1, and supervisord restarts the pool (its crash watch tells the user);
  meanwhile the firewall keeps the dead worker's connections refused (fail closed);
- SIGHUP (a policy reload) is passed to every worker that is ready, and to one that
  is still starting once it is: before then it may not handle SIGHUP yet (the
  default action would kill it), and it may have read the policy before the edit.
  The console script blocks SIGHUP before the import (launch.py), so one that comes
  while the pool imports waits for it too;
- SIGTERM or SIGINT stops the workers (SIGTERM each, SIGKILL after STOP_WAIT),
  then the pool exits 0;
- a worker whose pool dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG), so a
  killed pool never leaves workers holding the ports its restart needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from loguru import logger

#: A worker tells its pool it is ready with this signal: real-time ones queue (one each,
#: with the sender's pid), where two SIGUSR1 at once would be one.
READY = signal.SIGRTMIN
TAKEN = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, READY)
#: A worker that dies this often within CRASH_WINDOW seconds ends the pool (exit 1).
GIVE_UP = 5
CRASH_WINDOW = 30.0
#: The pause before forking a dead worker again: FIRST_PAUSE, doubled for each recent
#: death, at most MAX_PAUSE (a port still held a moment by the old one, a busy disk).
FIRST_PAUSE = 0.1
MAX_PAUSE = 2.0
#: How long stopping waits for the workers before SIGKILL (supervisord's stopwaitsecs
#: for the pool is longer).
STOP_WAIT = 4.0

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def worker_comm(n: int) -> str:
    """Worker n's process name (/proc/<pid>/comm, what `ps` and `pgrep` show)."""
    return f"interceptor-{n}"


def _prctl(option: int, value: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _send(pid: int, signum: int) -> None:
    """A signal to a process that may have just died (it is then no one's to take)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


_pool_pid: int | None = None  # in a worker: its pool's


def announce_ready() -> None:
    """A worker is listening (the readiness addon calls this); no-op outside a pool."""
    if _pool_pid is not None:
        _send(_pool_pid, READY)


def _become_worker(n: int, pool: int) -> None:
    """In a freshly forked worker: its name, its death with the pool, normal signals."""
    global _pool_pid
    _pool_pid = pool
    _prctl(_PR_SET_NAME, worker_comm(n).encode())
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pool:  # the pool died before the line above took effect
        os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class Pool:
    """The workers and their deaths; `run` is the whole life of the pool process."""

    def __init__(self, workers: int, serve: Callable[[int], int]) -> None:
        self.workers = workers
        self.serve = serve  # runs worker n in the forked process; its exit status
        self.pid = os.getpid()
        self.ready: set[int] = set()  # workers that were ready once
        self.listening: set[int] = set()  # pids that said they are ready
        self.owed_hup: set[int] = set()  # pids signalled SIGHUP before they were
        self.running: dict[int, int] = {}  # pid -> worker n
        self.deaths: dict[int, list[float]] = {}  # worker n -> monotonic times
        self.due: dict[int, float] = {}  # worker n -> when to fork it again

    def fork(self, n: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                _become_worker(n, self.pid)
                status = self.serve(n)
            except SystemExit as exc:
                status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        self.running[pid] = n

    def reap(self, now: float) -> bool:
        """Collect dead workers and schedule them again; False to give up."""
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return True
            n = self.running.pop(pid, None)
            self.listening.discard(pid)
            self.owed_hup.discard(pid)
            if n is None:
                continue
            how = _exit_text(status)
            if n not in self.ready and n not in self.deaths:  # the first one never was
                logger.error(
                    "worker {} (pid {}) {} while starting: not starting (exit 1)", n, pid, how
                )
                return False
            recent = [t for t in self.deaths.get(n, []) if now - t < CRASH_WINDOW] + [now]
            self.deaths[n] = recent
            if len(recent) >= GIVE_UP:
                logger.error(
                    "worker {} (pid {}) {}: died {} times in {:.0f} s, giving up (exit 1)",
                    n,
                    pid,
                    how,
                    len(recent),
                    CRASH_WINDOW,
                )
                return False
            pause = min(MAX_PAUSE, FIRST_PAUSE * 2 ** (len(recent) - 1))
            logger.warning(
                "worker {} (pid {}) {}; forking it again in {:.1f} s", n, pid, how, pause
            )
            self.due[n] = now + pause
        return True

    def on_ready(self, pid: int) -> None:
        if pid not in self.running:
            return
        self.ready.add(self.running[pid])
        self.listening.add(pid)
        if pid in self.owed_hup:
            self.owed_hup.discard(pid)
            _send(pid, signal.SIGHUP)

    def reload(self) -> None:
        for pid in self.running:
            if pid in self.listening:
                _send(pid, signal.SIGHUP)
            else:
                self.owed_hup.add(pid)

    def signal_all(self, signum: int) -> None:
        for pid in list(self.running):
            _send(pid, signum)

    def stop(self) -> None:
        """SIGTERM every worker, wait for them, SIGKILL what is left after STOP_WAIT."""
        self.due.clear()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while self.running:
            left = deadline - time.monotonic()
            if left <= 0:
                self.signal_all(signal.SIGKILL)
                deadline = time.monotonic() + 1.0
                left = 1.0
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.running.pop(pid, None)
                continue
            signal.sigtimedwait([signal.SIGCHLD], min(left, 0.2))

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, TAKEN)
        for n in range(self.workers):
            self.fork(n)
        logger.info("interceptor pool: {} worker(s), pids {}", self.workers, list(self.running))
        while True:
            now = time.monotonic()
            for n, when in list(self.due.items()):
                if when <= now:
                    del self.due[n]
                    self.fork(n)
            wait = min(self.due.values()) - now if self.due else None
            info = (
                signal.sigtimedwait(TAKEN, max(0.0, wait))
                if wait is not None
                else signal.sigwaitinfo(TAKEN)
            )
            if info is None:
                continue
            if info.si_signo == signal.SIGCHLD:
                # sigwaitinfo hands out SIGCHLD before a real-time signal: a worker that
                # said it is ready and then died must count as having been ready.
                while ready := signal.sigtimedwait([READY], 0):
                    self.on_ready(ready.si_pid)
                if not self.reap(time.monotonic()):
                    self.stop()
                    return 1
            elif info.si_signo == READY:
                self.on_ready(info.si_pid)
            elif info.si_signo == signal.SIGHUP:
                self.reload()
            else:
                logger.info("interceptor pool: stopping {} worker(s)", len(self.running))
                self.stop()
                return 0


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited {os.waitstatus_to_exitcode(status)}"


def run(workers: int, serve: Callable[[int], int]) -> int:
    """Fork `workers` processes, each running serve(n), and keep them running until
    SIGTERM/SIGINT; the pool's exit status."""
    return Pool(workers, serve).run()
