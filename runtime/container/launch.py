"""The container programs' console scripts: each imports its program with Python's
cyclic garbage collector paused, then runs it as usual.

Starting one of these programs is mostly importing it (mitmproxy's proxy layers,
asyncio, loguru): tens of thousands of new objects, every 700 of which start a
collection that finds nothing to free. Up to eight such programs start at once on
the container's cores, so pausing the collector while importing takes 10-25% off
the start (BENCHMARKS.md). What the imports made is then frozen (gc.freeze: moved
out of the collected generations, never scanned again) and the collector resumes.

    python -m runtime.container.launch supervisord -c <conf>   (the init starts it so)

The init starts supervisord before it has written what the programs read at start
(the policy, the session, the CA, the logs), so that their imports run meanwhile on
the other core. Each program then waits, after its import, for the init's
`prepared` marker, named by SECURE_PROXY_PREPARED (set only in supervisord's
environment: a program run by hand does not wait).
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any


def load(target: str) -> Callable[[], Any]:
    """`module:function`, imported with the collector paused."""
    module, _, function = target.partition(":")
    gc.disable()
    try:
        return getattr(importlib.import_module(module), function)
    finally:
        gc.freeze()
        gc.enable()


#: The init's marker a supervised program waits for after its import (see above).
PREPARED_ENV = "SECURE_PROXY_PREPARED"
PREPARED_TIMEOUT = float(os.environ.get("SECURE_PROXY_PREPARED_TIMEOUT", "60"))


def await_prepared() -> None:
    """Until the init's `prepared` marker exists; exit 1 if it does not in time (the
    init failed and stops supervisord). Usually there already: the import took longer."""
    marker = os.environ.get(PREPARED_ENV)
    if not marker:
        return
    deadline = time.monotonic() + PREPARED_TIMEOUT
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            sys.exit(f"{marker} did not appear within {PREPARED_TIMEOUT:.0f} s: the init failed")
        time.sleep(0.005)


def service(target: str) -> Any:
    """A supervised program: imported, then started once the init has prepared."""
    main = load(target)
    await_prepared()
    return main()


def init() -> Any:
    return load("runtime.container.init:entrypoint")()


def interceptor() -> Any:
    # A reload (SIGHUP) while it imports must wait, not kill it (the default action):
    # the pool takes the signal once it runs and passes it on (interceptor/pool.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
    return service("runtime.container.interceptor.main:main")


def reloader() -> Any:
    return service("runtime.container.reloader:main")


def logguard() -> Any:
    return service("runtime.container.logguard:main")


def dnsguard() -> Any:
    return service("runtime.container.dnsguard:main")


def portkeeper() -> Any:
    return service("runtime.container.portkeeper:main")


def firewall() -> Any:
    return service("firewall.cli:main")


def supervisord() -> Any:
    return load("supervisor.supervisord:main")()


PROGRAMS: dict[str, Callable[[], Any]] = {
    "supervisord": supervisord,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
        sys.exit(f"usage: python -m runtime.container.launch {{{','.join(PROGRAMS)}}} [args]")
    name = sys.argv.pop(1)
    sys.argv[0] = name
    sys.exit(PROGRAMS[name]())
