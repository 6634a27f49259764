"""Copy the current source to a world-readable place so non-root uids can run it.

The checkout may live under /root (mode 0700): a process running as an
unprivileged uid could not import it from there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGED_DIRS = ("runtime", "firewall", "config", "tests/harness")
DEFAULT_PYTHON = "/opt/sp-venv/bin/python"


def python_bin() -> str:
    """Interpreter for processes in namespaces (must be executable by any uid)."""
    return os.environ.get("SP_PYTHON", DEFAULT_PYTHON)


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}


def stage_source(dest: Path | str | None = None) -> str:
    """Copy runtime/, firewall/, config/ (and the harness) to a fresh 0755 directory.

    Returns the directory, which is the PYTHONPATH to use: `import firewall`,
    `import runtime` and `python -m tests.harness.dns` work from it.
    """
    root = Path(dest) if dest else Path(tempfile.mkdtemp(prefix="sp-src-"))
    root.mkdir(parents=True, exist_ok=True)
    for rel in STAGED_DIRS:
        src = REPO_ROOT / rel
        if src.is_dir():
            shutil.copytree(src, root / rel, ignore=_ignore, dirs_exist_ok=True)
    # tests/ itself is a plain package directory so `tests.harness` imports.
    if (root / "tests").is_dir():
        (root / "tests" / "__init__.py").touch()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    # mkdtemp makes 0700 dirs; every parent must be traversable by other uids.
    for parent in root.parents:
        if parent == Path("/"):
            break
        if not os.stat(parent).st_mode & 0o001:
            raise PermissionError(f"{parent} is not traversable by other users; stage elsewhere")
    return str(root)
