"""The line a run leaves on stderr when something was blocked or flagged.

Before the engine starts, the CLI notes where the traffic log ends (its inode and
size); when the engine has exited, it reads what was appended since, and prints
one line (runtime.host.logview.end_of_run_line): how many requests were blocked
or flagged, the top hosts, and the command that lists them. This is why every
run is waited for rather than exec'd (runtime.host.writable.wait_for).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from runtime import paths
from runtime.host import logview


@dataclass(frozen=True)
class Mark:
    log: Path
    inode: int | None  # None: no log yet
    offset: int
    started: datetime


def mark(logs_dir: Path) -> Mark:
    log = logs_dir / paths.traffic_log().name
    started = datetime.now(UTC).replace(microsecond=0)
    try:
        st = os.stat(log)
    except OSError:
        return Mark(log, None, 0, started)
    return Mark(log, st.st_ino, st.st_size, started)


def entries_since(m: Mark) -> list[logview.Entry]:
    """The entries appended during the run (the whole file if it was replaced)."""
    try:
        with open(m.log, "rb") as handle:
            if os.fstat(handle.fileno()).st_ino == m.inode:
                handle.seek(m.offset)
            data = handle.read()
    except OSError as exc:
        logger.debug("no end-of-run summary: {}", exc)
        return []
    text = data.decode("utf-8", errors="replace")
    return logview.parse_lines(text.splitlines()).entries


def logs_command(m: Mark, logs_dir: Path | None) -> str:
    since = m.started.strftime("%Y-%m-%dT%H:%M:%SZ")
    argv = ["copilot_here", "--network-logs", "--blocked", "--violations", "--since", since]
    if logs_dir is not None:
        argv += ["--logs-dir", str(logs_dir)]
    return shlex.join(argv)


def report(m: Mark | None, logs_dir: Path | None) -> None:
    """Print the end-of-run line to stderr, if anything was blocked or flagged."""
    if m is None:
        return
    line = logview.end_of_run_line(entries_since(m), logs_command(m, logs_dir))
    if line:
        print(line, file=sys.stderr, flush=True)
