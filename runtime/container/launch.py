"""The container programs' console scripts: each imports its program with Python's
cyclic garbage collector paused, then runs it as usual.

Starting one of these programs is mostly importing it (mitmproxy's proxy layers,
asyncio, loguru): tens of thousands of new objects, every 700 of which start a
collection that finds nothing to free. Up to eight such programs start at once on
the container's cores, so pausing the collector while importing takes 10-25% off
the start (BENCHMARKS.md). What the imports made is then frozen (gc.freeze: moved
out of the collected generations, never scanned again) and the collector resumes.

    python -m runtime.container.launch supervisord -c <conf>   (the init starts it so)
"""

from __future__ import annotations

import gc
import importlib
import signal
import sys
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


def init() -> Any:
    return load("runtime.container.init:entrypoint")()


def interceptor() -> Any:
    # A reload (SIGHUP) while it imports must wait, not kill it (the default action):
    # the pool takes the signal once it runs and passes it on (interceptor/pool.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
    return load("runtime.container.interceptor.main:main")()


def reloader() -> Any:
    return load("runtime.container.reloader:main")()


def logguard() -> Any:
    return load("runtime.container.logguard:main")()


def dnsguard() -> Any:
    return load("runtime.container.dnsguard:main")()


def portkeeper() -> Any:
    return load("runtime.container.portkeeper:main")()


def firewall() -> Any:
    return load("firewall.cli:main")()


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
