"""runtime.install's pip for the image: the venv's own, else pip run from its wheel
(the venv copied from the builder has none and gets none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import install


def test_the_venvs_own_pip_first(tmp_path: Path) -> None:
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "venv/bin/pip").write_text("#!/bin/sh\n")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels/pip-26.3-py3-none-any.whl").write_bytes(b"")
    assert install.pip_command(tmp_path / "venv", tmp_path / "wheels") == [
        str(tmp_path / "venv/bin/pip")
    ]


def test_else_pip_from_its_wheel_without_installing_it(tmp_path: Path) -> None:
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels/pip-26.3-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert install.pip_command(tmp_path / "venv", tmp_path / "wheels") == [
        str(tmp_path / "venv/bin/python"),
        f"{wheel}/pip",
    ]


def test_no_pip_anywhere_names_both_places(tmp_path: Path) -> None:
    (tmp_path / "venv/bin").mkdir(parents=True)
    with pytest.raises(install.InstallError, match=r"no pip in .*venv/bin and no pip-\*\.whl"):
        install.pip_command(tmp_path / "venv", None)
