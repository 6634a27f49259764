"""image/runtime-requirements.txt as data: what the image's venv pins, what it leaves out."""

from __future__ import annotations

import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "image" / "runtime-requirements.txt"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: Path = REQUIREMENTS) -> dict[str, str]:
    """Distribution (canonical name) -> pinned version."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path}: {raw!r} is not pinned as name==version"
        found[canonical(name)] = version.strip()
    return found


def left_out(path: Path = REQUIREMENTS) -> set[str]:
    """Distributions mitmproxy declares that the image leaves out (`# left out:` lines)."""
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        if raw.startswith("# left out:"):
            names.update(canonical(n) for n in raw.split(":", 1)[1].split())
    return names
