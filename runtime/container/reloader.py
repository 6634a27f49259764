"""secure-proxy-reloader: live rule edits with --network-config-write.

The config source is the one init chose at start (session.json); it stays the
source for the whole session. The reloader watches the config's *directory*
(inotify sees nothing on a single-file bind mount, and editors that save by
rename replace the inode), debounces bursts of events, validates through the
same core as init, writes policy.json atomically and sends SIGHUP to the
interceptor and the DNS guard. An edit that changes the firewall level (rules or
the log switched on or off) moves the services and the firewall to the new level
(services.switch). An invalid edit keeps the last good policy and logs exactly
what is wrong. A read-only mount (the default) is said once; then nothing is
watched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from firewall.level import LockLevel, lock_level
from runtime.container import services, supervisor
from runtime.container.console import SetupFailed
from runtime.container.session import Session, SessionError, read_only
from runtime.core.config import ConfigError
from runtime.core.policy import Policy
from runtime.policyfile import read_policy, write_policy
from runtime.resolve import (
    compile_resolved,
    read_config,
    values_from_environ,
)

DEBOUNCE_SECONDS = 0.1


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} reloader: {message}", flush=True)


class Reloader:
    def __init__(self, kind: str, config_path: Path, level: LockLevel) -> None:
        self.kind = kind
        self.path = config_path
        self.level = level  # what the firewall and the services are at now
        self.last_digest: str | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def _digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def prime(self, digest: str | None = None) -> None:
        """The digest init compiled from, so an edit made during startup is not missed."""
        self.last_digest = digest or self._digest()

    def reload(self) -> bool:
        """Re-read, validate, compile, write, signal. False when the edit was rejected."""
        with self._lock:
            digest = self._digest()
            if digest is not None and digest == self.last_digest:
                return True
            if digest is None:
                log(
                    f"{self.path} is gone; keeping the last good policy (restore the file "
                    "to change rules)"
                )
                self.last_digest = None
                return False
            try:
                config = read_config(self.path)
                values = values_from_environ()  # as the init: the host's approved origin
                resolved = compile_resolved(self.kind, self.path, config, values=values)
            except ConfigError as exc:
                log(f"invalid edit, keeping the last good policy:\n{exc}")
                self.last_digest = digest
                return False
            write_policy(resolved.policy)
            self.last_digest = digest
            log(
                f"applied {self.path}: mode {resolved.policy.mode.value}, "
                f"{len(resolved.policy.rules)} rules"
            )
            return self.enforce(resolved.policy)

    def enforce(self, policy: Policy) -> bool:
        """The services and the firewall in line with the policy just written."""
        new = lock_level(policy)
        if new is self.level:
            for failure in services.signal_services(new):
                log(f"could not signal {failure}; it loads policy.json when it next starts")
            return True
        log(f"firewall level {self.level.value} -> {new.value}")
        try:
            services.switch(self.level, new)
        except services.ServicesDown as exc:
            self.level = new  # the firewall is there: the next edit starts from it
            log(f"firewall level {new.value} in force, failing closed: {exc}")
            return False
        except (SetupFailed, *supervisor.RPC_ERRORS) as exc:
            log(f"the new level is NOT in force (the next edit tries again): {exc}")
            return False
        self.level = new
        log(f"firewall level {new.value} in force")
        return True

    def poke(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(DEBOUNCE_SECONDS, self.reload)
            self._timer.daemon = True
            self._timer.start()


def watch(reloader: Reloader, stop: threading.Event) -> None:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    target = reloader.path.name

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            names = {os.path.basename(str(event.src_path))}
            dest = getattr(event, "dest_path", "")
            if dest:
                names.add(os.path.basename(str(dest)))
            if target in names:
                reloader.poke()

    observer = Observer()
    observer.schedule(Handler(), str(reloader.path.parent), recursive=False)
    observer.start()
    try:
        while not stop.wait(1.0):
            # Belt and braces: an event lost to a full inotify queue is caught here.
            if reloader._digest() != reloader.last_digest:
                reloader.poke()
    finally:
        observer.stop()
        observer.join(timeout=2)


def idle(stop: threading.Event) -> int:
    stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        session = Session.read()
    except SessionError as exc:
        log(f"{exc}; the init writes it before starting supervisord: watching nothing")
        return idle(stop)
    path = session.config_path
    if path is None:
        log("no network.json at start (built-in defaults): nothing to watch this session")
        return idle(stop)
    if read_only(path.parent):
        log(
            f"{path.parent} is mounted read-only: rules are fixed for this session "
            "(run with --network-config-write to edit them live); watching nothing"
        )
        return idle(stop)
    try:
        level = lock_level(read_policy())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log(f"cannot read the policy the init wrote ({exc}); watching nothing")
        return idle(stop)
    reloader = Reloader(session.config_kind, path, level)
    reloader.prime(session.config_sha256)
    log(f"watching {path.parent} for changes to {path.name}")
    with contextlib.suppress(KeyboardInterrupt):
        watch(reloader, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
