"""The traffic log's writer: /logs/traffic.jsonl, one JSON object per line.

What a line holds is runtime.core.record's (one dataclass per kind: HttpRecord
for the interceptor, DnsRecord for the DNS guard); config/traffic-log.schema.json
describes it for readers, and a unit test keeps the two in step.

Every line is written with one os.write() on an O_APPEND descriptor: the
kernel appends it whole, so lines of several writer processes never
interleave or break.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from loguru import logger

from runtime import paths
from runtime.core.record import Record, to_dict

SCHEMA_FILE = "traffic-log.schema.json"


def schema_path() -> Path:
    return paths.share_dir() / SCHEMA_FILE


#: json.dumps with separators builds a new encoder per call; this one is built once.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_line(record: Record) -> bytes:
    """The bytes of one line: compact ASCII JSON and a newline, so one line is one write."""
    return _ENCODER.encode(to_dict(record)).encode("ascii") + b"\n"


class TrafficLogWriter:
    """Appends lines to the traffic log, opening the file lazily and keeping it open.

    If the file is replaced or removed (log rotation, the log guard repairing
    tampering), the next write after `recheck_seconds` notices and reopens it.
    Write errors are reported and never raised: `write` says whether the line is
    in the file, and the caller decides what a lost line means (the interceptor
    refuses requests that must be logged).

    A line is written whole or not at all: a short write (the disk filled in the
    middle of it) is cut off again, so the file ends with a complete line and
    the next line starts clean. If it cannot be cut off (another process wrote
    after it), or the file was found ending in a fragment, the next line starts
    with a newline of its own: a fragment never runs into a good line.
    """

    def __init__(self, path: Path | str | None = None, recheck_seconds: float = 1.0) -> None:
        self.path = Path(path) if path is not None else paths.traffic_log()
        self.recheck_seconds = recheck_seconds
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._checked = 0.0
        self._failing = False
        self._torn = False  # the file ends in a fragment: start the next line on a new one

    def _open(self) -> int:
        # Read access too: to see how the file ends (only its last byte is ever read).
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o644)
        try:
            st = os.fstat(fd)
            self._torn = st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n"
        except OSError:
            os.close(fd)
            raise
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        self._checked = time.monotonic()
        return fd

    def _current_fd(self) -> int:
        if self._fd is None:
            return self._open()
        now = time.monotonic()
        if now - self._checked >= self.recheck_seconds:
            self._checked = now
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._inode
            except FileNotFoundError:
                same = False
            if not same:
                self.close()
                return self._open()
        return self._fd

    def write(self, record: Record) -> bool:
        """Append one line; True once all of it is in the file."""
        data = encode_line(record)
        try:
            fd = self._current_fd()
            if self._torn:
                data = b"\n" + data
            written = os.write(fd, data)
            if written != len(data):  # the disk filled in the middle of the line
                self._take_back(fd, written)
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            if not self._failing:
                logger.error(
                    "traffic log {}: cannot write ({}); requests that must be logged are "
                    "refused until it can",
                    self.path,
                    exc,
                )
            self._failing = True
            self.close()
            return False
        self._torn = False
        if self._failing:
            logger.info("traffic log {}: writing again", self.path)
            self._failing = False
        return True

    def _take_back(self, fd: int, written: int) -> None:
        """Cut a partly written line off the end of the file again."""
        end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: just past what this write added
        try:
            # Only when nothing was appended after it (no one can on a full disk).
            if os.fstat(fd).st_size == end:
                os.ftruncate(fd, end - written)
                return
        except OSError as exc:
            logger.warning("traffic log {}: cannot cut off a partial line ({})", self.path, exc)
        self._torn = True

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def read_lines(path: Path | str) -> list[dict[str, Any]]:
    """Parse a traffic log (tests and tooling)."""
    text = Path(path).read_text(encoding="ascii")
    return [json.loads(line) for line in text.splitlines() if line]
