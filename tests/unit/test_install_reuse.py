"""The sandbox's thin venv sees the reused venv's packages and .pth files, but not an
editable install of this project (ours is copied in)."""

from __future__ import annotations

import os
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


def test_our_packages_arrive_with_valid_bytecode_stale_and_missing_compiled(
    tmp_path: Path, monkeypatch
) -> None:
    """The copy keeps a checkout's __pycache__ (valid .pyc name their source's mtime and
    size, which the copy keeps) and compile_packages writes what is missing or stale, so
    no program compiles our modules at each start; a stray legacy .pyc is not copied."""
    import importlib.util
    import py_compile
    import shutil

    from runtime import install

    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    for name in ("kept", "missing", "stale"):
        (src / f"{name}.py").write_text(f"NAME = {name!r}\n")
    for name in ("kept", "stale"):
        py_compile.compile(str(src / f"{name}.py"))
    (src / "stale.py").write_text("NAME = 'changed since compiled'\n")
    later = (src / "stale.py").stat().st_mtime + 10  # an edit after the compile
    os.utime(src / "stale.py", (later, later))
    (src / "legacy.pyc").write_bytes(b"old")
    monkeypatch.setattr(install, "PACKAGES", ("pkg",))

    site = tmp_path / "site"
    shutil.copytree(src, site / "pkg", ignore=install._ignore)
    assert not (site / "pkg" / "legacy.pyc").exists()
    cached = {
        n: Path(importlib.util.cache_from_source(str(site / "pkg" / f"{n}.py")))
        for n in ("kept", "missing", "stale")
    }
    kept_before = cached["kept"].read_bytes()
    stale_before = cached["stale"].read_bytes()
    assert not cached["missing"].exists()

    install.compile_packages(site)
    assert cached["kept"].read_bytes() == kept_before  # valid: only checked
    assert cached["missing"].exists()
    assert cached["stale"].read_bytes() != stale_before  # recompiled from the new source
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r}); import pkg.stale as s; print(s.NAME)",
        ],
        cwd=site,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "changed since compiled", out.stderr
