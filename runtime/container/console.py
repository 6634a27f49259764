"""What the init tells the user, and the one error that stops the start-up.

Status lines go to stderr so the command's stdout stays the command's.
"""

from __future__ import annotations

import os
import sys
import time

_T0 = time.monotonic()


class SetupFailed(Exception):
    """Start-up cannot continue; the message tells the user what failed and how to fix it."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def trace(stage: str) -> None:
    """Stage timings with SECURE_PROXY_TRACE=1 (start-up time is user-visible)."""
    if os.environ.get("SECURE_PROXY_TRACE") == "1":
        print(f"[init +{time.monotonic() - _T0:.2f}s] {stage}", file=sys.stderr, flush=True)
