"""Host state directories: created without following symlinks, owned by the user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.host.hoststate import StateError, ensure_private_dir, path_key, state_root


def test_state_root_prefers_absolute_xdg(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert state_root(home, {}) == home / ".local/state/copilot_here"
    assert state_root(home, {"XDG_STATE_HOME": "/x"}) == Path("/x/copilot_here")
    assert state_root(home, {"XDG_STATE_HOME": "rel"}) == home / ".local/state/copilot_here"


def test_path_key_is_stable_and_distinct() -> None:
    assert path_key(Path("/a/proj")) == path_key(Path("/a/proj"))
    assert path_key(Path("/a/proj")) != path_key(Path("/b/proj"))
    assert path_key(Path("/a/my proj:x")).startswith("my_proj_x-")


def test_creates_nested_private_dirs(tmp_path: Path) -> None:
    root = tmp_path / "state"
    made = ensure_private_dir(root / "logs" / "p", root)
    assert made.is_dir() and oct(made.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("where", ["root", "middle", "leaf"])
def test_symlink_anywhere_is_refused_and_target_untouched(tmp_path: Path, where: str) -> None:
    root = tmp_path / "state"
    target = tmp_path / "victim"
    target.mkdir()
    link = {"root": root, "middle": root / "logs", "leaf": root / "logs" / "p"}[where]
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    with pytest.raises(StateError, match="symlink"):
        ensure_private_dir(root / "logs" / "p", root)
    assert list(target.iterdir()) == []


def test_other_owner_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "logs").mkdir(parents=True)
    os.chown(root / "logs", 4321, 4321)
    with pytest.raises(StateError, match="belongs to uid 4321"):
        ensure_private_dir(root / "logs" / "p", root)


def test_file_in_place_of_dir_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir()
    (root / "logs").write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        ensure_private_dir(root / "logs" / "p", root)
