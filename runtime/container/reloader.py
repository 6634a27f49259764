"""secure-proxy-reloader: live rule edits with --network-config-write.

The config source is the one init chose at start (session.json); it stays the
source for the whole session. The reloader watches the config's *directory*
(inotify sees nothing on a single-file bind mount, and editors that save by
rename replace the inode), debounces bursts of events, validates through the
same core as init, writes policy.json atomically and sends SIGHUP to the
interceptor. An invalid edit keeps the last good policy and logs exactly what
is wrong. A read-only mount (the default) is said once; then nothing is watched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

from runtime import paths
from runtime.core.config import ConfigError
from runtime.resolve import compile_resolved, read_config, values_from_environ, write_policy

DEBOUNCE_SECONDS = 0.1


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} reloader: {message}", flush=True)


def supervisor_rpc() -> xmlrpc.client.ServerProxy:
    from supervisor.xmlrpc import SupervisorTransport

    url = f"unix://{paths.supervisor_socket()}"
    return xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, url)
    )


def signal_interceptor() -> None:
    """SIGHUP through supervisord (it knows the pid, also across restarts)."""
    try:
        supervisor_rpc().supervisor.signalProcess("interceptor", "HUP")
    except (OSError, xmlrpc.client.Fault) as exc:
        log(
            f"could not signal the interceptor through supervisord ({exc}); it loads the "
            "new policy.json when it next starts"
        )


def read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Reloader:
    def __init__(self, kind: str, config_path: Path) -> None:
        self.kind = kind
        self.path = config_path
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
            signal_interceptor()
            log(
                f"applied {self.path}: mode {resolved.policy.mode.value}, "
                f"{len(resolved.policy.rules)} rules"
            )
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


def session() -> dict[str, object]:
    try:
        return json.loads(paths.session_file().read_text())
    except (OSError, ValueError):
        return {}


def idle(stop: threading.Event) -> int:
    stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    info = session()
    kind = str(info.get("config_kind", "built-in"))
    config = info.get("config_path")
    if not config:
        log("no network.json at start (built-in defaults): nothing to watch this session")
        return idle(stop)
    path = Path(str(config))
    if read_only(path.parent):
        log(
            f"{path.parent} is mounted read-only: rules are fixed for this session "
            "(run with --network-config-write to edit them live); watching nothing"
        )
        return idle(stop)
    reloader = Reloader(kind, path)
    reloader.prime(str(info.get("config_sha256") or "") or None)
    log(f"watching {path.parent} for changes to {path.name}")
    with contextlib.suppress(KeyboardInterrupt):
        watch(reloader, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
