"""The sandbox's thin venv sees the reused venv's packages and .pth files, but not an
editable install of this project (ours is copied in)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runtime.install import DIST_NAME, deps_pth


def test_reused_site_dir_and_its_pth_files_but_not_our_editable_install(tmp_path: Path) -> None:
    reused = tmp_path / "site-packages"
    (reused / "extra").mkdir(parents=True)
    (reused / "adds-extra.pth").write_text("extra\nimport os; os.environ['PTH_RAN'] = '1'\n")
    (reused / f"__editable__.{DIST_NAME}-0.1.0.pth").write_text(
        "import os; os.environ['OUR_EDITABLE_RAN'] = '1'\n"
    )
    line = deps_pth(reused)
    assert line.endswith("\n") and line.count("\n") == 1  # site runs a .pth line by line
    probe = (
        line.strip()
        + "\nimport os, sys\n"
        + "print(sys.path[-2:], os.environ.get('PTH_RAN'), os.environ.get('OUR_EDITABLE_RAN'))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{[str(reused), str(reused / 'extra')]} 1 None"
