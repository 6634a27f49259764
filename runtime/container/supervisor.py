"""supervisord as the init and the reloader use it: start, readiness, RPC, stop.

supervisord gives its children pipes and always exits 0, so it only manages the
services; the init owns the terminal and the exit code. It runs in a session of
its own with stdin /dev/null, and its socket is root's (supervisord.conf).
Readiness is a marker file per component, never a timing: `priority` only orders
the starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import paths
from runtime.container.console import SetupFailed, say
from runtime.container.leftovers import reap_zombies
from runtime.container.signals import unblock

STOP_TIMEOUT = 8.0
RPC_ERRORS = (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError)


def rpc() -> Any:
    """The supervisord XML-RPC client, over its unix socket (root only)."""
    from supervisor.xmlrpc import SupervisorTransport

    url = f"unix://{paths.supervisor_socket()}"
    return xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, url)
    ).supervisor


def knock() -> bool:
    """Wake supervisord's loop: a connection to its socket. It acts (spawns, stops the
    next group, exits) only when its poll returns, which is after 1 s unless something
    arrives on one of its descriptors; a program's exit is not always such a thing.
    True when supervisord took the connection."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            sock.connect(str(paths.supervisor_socket()))
    except OSError:
        return False
    return True


#: How long wake_when_listening() knocks before it leaves it to wait_ready.
WAKE_LIMIT = 5.0


def wake_when_listening() -> threading.Thread:
    """Knock (from a thread) until supervisord listens, so that it spawns its programs
    then rather than at wait_ready's first look: they import while the init makes the
    CA, writes what they read (they wait for its `prepared` marker: launch.py), creates
    the app user and trusts the CA. Join it before forking the command."""

    def run() -> None:
        deadline = time.monotonic() + WAKE_LIMIT
        while not knock() and time.monotonic() < deadline:
            time.sleep(KNOCK_POLL)

    thread = threading.Thread(target=run, name="supervisord-wake", daemon=True)
    thread.start()
    return thread


def process_info(name: str) -> dict[str, Any] | None:
    """supervisord's view of one program, None when supervisord does not answer."""
    try:
        return rpc().getProcessInfo(name)
    except RPC_ERRORS:
        return None


ALREADY_STARTED = 60  # supervisor.xmlrpc.Faults
NOT_RUNNING = 70


def signal_process(name: str, signame: str) -> None:
    """Signal a program through supervisord (it knows the pid, also across restarts).
    Raises one of RPC_ERRORS when that fails."""
    rpc().signalProcess(name, signame)


def start_program(name: str) -> None:
    """Start a program (no-op when it runs); its readiness is its marker."""
    try:
        rpc().startProcess(name, False)
    except xmlrpc.client.Fault as exc:
        if exc.faultCode != ALREADY_STARTED:
            raise


def stop_program(name: str) -> None:
    """Stop a program and wait until it has (no-op when it does not run)."""
    try:
        rpc().stopProcess(name, True)
    except xmlrpc.client.Fault as exc:
        if exc.faultCode != NOT_RUNNING:
            raise


def run_once(name: str, timeout: float) -> str | None:
    """Run a one-shot program (the firewall) to its end: None when it exited 0,
    else why not (with the last line of its log)."""
    start_program(name)  # spawned when this returns: the states below are this run's
    deadline = time.monotonic() + timeout
    while True:
        info = rpc().getProcessInfo(name)
        state = info.get("statename")
        if state == "EXITED" and info.get("exitstatus") == 0:
            return None
        if state not in ("STARTING", "RUNNING"):
            last = tail(paths.component_log(name), 1)
            return last[0] if last else f"{state}, exit status {info.get('exitstatus')}"
        if time.monotonic() > deadline:
            return f"still running after {timeout:.0f} s"
        time.sleep(0.05)


def tail(path: Path, lines: int = 5) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    conf = paths.supervisor_conf()
    if not conf.is_file():
        raise SetupFailed(
            f"{conf} is missing: the runtime is not installed (run secure-proxy-install)"
        )
    out = open(paths.component_log("supervisord-stdout"), "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "runtime.container.launch", "supervisord", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=unblock,
        )
    finally:
        out.close()


@dataclass(frozen=True)
class Component:
    """A program the command waits for: ready when its marker exists."""

    name: str  # the supervisord program (group:process for one of a group)
    marker: Path
    timeout: float
    one_shot: bool  # exits when done (the firewall): an exit without the marker fails
    logfile: Path | None = None  # default: the program's component log

    @property
    def log(self) -> Path:
        return self.logfile or paths.component_log(self.name)

    def failure(self, info: dict[str, Any] | None) -> str | None:
        """Why it cannot become ready, from supervisord's state; None while it may."""
        state = (info or {}).get("statename")
        if self.one_shot and state in ("EXITED", "FATAL", "BACKOFF"):
            last = tail(self.log, 1)
            return (
                f"The {self.name} could not lock the network: "
                + (last[0] if last else f"exit status {(info or {}).get('exitstatus')}")
                + f"\nThe command was not started (fail closed). Log: {self.log}"
            )
        if not self.one_shot and state == "FATAL":
            return (
                f"The {self.name} failed to start (gave up after retries); the command "
                f"was not started. Log: {self.log}\n" + "\n".join(tail(self.log))
            )
        return None

    def too_slow(self) -> str:
        if self.one_shot:
            return (
                f"The {self.name} did not report a verified lock within {self.timeout:.0f} s; "
                f"the command was not started. Log: {self.log}"
            )
        return (
            f"The {self.name} was not ready within {self.timeout:.0f} s; the command was "
            f"not started. Log: {self.log}\n" + "\n".join(tail(self.log))
        )


#: How often wait_ready looks for the markers (a stat each): the command starts at most
#: this long after the last service is ready.
MARKER_POLL = 0.01
#: How often wait_ready asks supervisord for the programs' states (failure detection).
STATE_POLL = 0.25
#: How often wait_ready knocks until supervisord first answers. supervisord 4.3 spawns
#: its autostart programs only when its first poll returns: after 1 s, or at once when
#: something arrives on its socket (upstream's fix, Supervisor/supervisor#1700, is not
#: released). The first answered look is what starts the services.
KNOCK_POLL = 0.005


def wait_ready(
    components: Sequence[Component],
    pause: Callable[[float], None],
    sup: subprocess.Popen[bytes] | None = None,
    backoff_fails: bool = False,
) -> None:
    """Every component's marker, or a clear failure (fail closed: the command waits).

    `pause` waits between polls (the init's: it also takes an aborting signal);
    `sup`, when the caller started supervisord, is watched too. `backoff_fails`: a
    service that exited while starting (BACKOFF) fails at once, not after its retries.
    """
    start_time = time.monotonic()
    pending = list(components)
    next_look = 0.0
    answered = False  # supervisord has answered a look (KNOCK_POLL until then)
    while pending:
        if sup is not None and sup.poll() is not None:
            raise SetupFailed(
                "supervisord exited during startup; see "
                f"{paths.component_log('supervisord')}\n"
                + "\n".join(tail(paths.component_log("supervisord-stdout")))
            )
        elapsed = time.monotonic() - start_time
        # Markers at every poll (a stat), supervisord's states less often: each look is
        # an XML-RPC round trip, CPU on both sides while the services start beside it.
        look = elapsed >= next_look
        if look:
            next_look = elapsed + STATE_POLL
        for component in list(pending):
            if component.marker.exists():
                pending.remove(component)
                continue
            if not look:
                continue
            info = process_info(component.name)
            if not answered:
                # A fault is an answer too; only a socket that takes no connection is not.
                answered = info is not None or knock()
                if not answered:
                    next_look = elapsed  # not listening yet: knock again at the next poll
            why = component.failure(info)
            if not why and backoff_fails and (info or {}).get("statename") == "BACKOFF":
                why = f"The {component.name} exited while starting. Log: {component.log}\n"
                why += "\n".join(tail(component.log))
            if why and component.marker.exists():  # it finished between the two looks
                pending.remove(component)
                continue
            if why:
                raise SetupFailed(why)
            if elapsed > component.timeout:
                raise SetupFailed(component.too_slow())
        if pending:
            pause(MARKER_POLL if answered else KNOCK_POLL)


def stop(sup: subprocess.Popen[bytes] | None, reaped: dict[int, int]) -> None:
    """SIGTERM supervisord (it stops its programs), SIGKILL its group if it lingers."""
    if sup is None or sup.pid in reaped:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(sup.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        reap_zombies(reaped)
        if sup.pid in reaped:
            return
        knock()
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sup.pid, signal.SIGKILL)
    reap_zombies(reaped)


class CrashWatch(threading.Thread):
    """Tells the user once if the interceptor keeps crashing (the web traffic it would
    take stays blocked). Its pool forks a dead worker again and exits when one keeps
    dying, so supervisord's restarts of the pool are what counts here."""

    def __init__(self) -> None:
        super().__init__(name="crash-watch", daemon=True)
        self.stop = threading.Event()

    def run(self) -> None:
        starts: list[float] = []
        last_pid: int | None = None
        while not self.stop.wait(1.0):
            info = process_info("interceptor")
            if info is None:
                continue
            pid = info.get("pid") or None
            if pid and pid != last_pid:
                if last_pid is not None:
                    starts.append(time.monotonic())
                last_pid = pid
            recent = [t for t in starts if time.monotonic() - t < 60]
            if info.get("statename") in ("FATAL", "BACKOFF") or len(recent) >= 3:
                say(
                    f"\n[Network] The interceptor keeps crashing (see "
                    f"{paths.component_log('interceptor')}); outbound web traffic stays "
                    "blocked until it recovers."
                )
                return
