"""Registry hosts come from the package managers' own configuration."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from runtime import registries

ROOT = Path(__file__).resolve().parents[2]


def detect(env: dict[str, str]) -> dict[str, list[str]]:
    code = "import json; from runtime import registries; print(json.dumps(registries.detect()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out)


def test_environment_names_the_mirrors() -> None:
    found = detect(
        {
            "npm_config_registry": "https://npm.mirror.test/repo/",
            "PIP_INDEX_URL": "https://pypi.mirror.test/simple https://second.test/simple",
        }
    )
    assert found == {"npm": ["npm.mirror.test"], "pypi": ["pypi.mirror.test", "second.test"]}


def test_pip_defaults_readable_without_an_importable_pip() -> None:
    """The image's runtime venv has no pip: the defaults come from pip's wheel."""
    wheels = [w for pattern in registries.PIP_WHEEL_GLOBS for w in glob.glob(pattern)]
    assert wheels, "python3-venv ships pip's wheel (python3-pip-whl)"
    no_site = subprocess.run(
        [sys.executable, "-S", "-c", "import pip"], capture_output=True, timeout=30
    )
    assert no_site.returncode != 0, "with -S pip must not be importable for this test"
    from_wheel = subprocess.run(
        [sys.executable, "-S", "-c", registries._READ_PYPI, sorted(wheels)[-1]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert len(from_wheel) == 2
    assert from_wheel == registries._pip_default_hosts()


def test_recorded_file_wins(tmp_path: Path) -> None:
    (tmp_path / registries.REGISTRIES_FILE).write_text('{"npm": ["a.test"], "pypi": []}')
    assert registries.registry_hosts(tmp_path) == {"npm": ["a.test"], "pypi": []}


def test_without_a_record_nothing_is_detected(tmp_path: Path, monkeypatch) -> None:
    """Only the installer asks npm and pip; a reader without a record gets None."""

    def no(*_a, **_k):
        raise AssertionError("registry_hosts() ran a tool")

    monkeypatch.setattr(registries, "detect", no)
    monkeypatch.setattr(registries.subprocess, "run", no)
    assert registries.registry_hosts(tmp_path) is None
    (tmp_path / registries.REGISTRIES_FILE).write_text("not json")
    assert registries.registry_hosts(tmp_path) is None


def test_without_a_system_pip_wheel_the_installers_wheel_is_read(tmp_path, monkeypatch):
    """The image has no python3-venv (no /usr/share/python-wheels): the installer
    hands over the builder's pip wheel, and pip's defaults are read from it."""
    wheel = tmp_path / "pip-26.3-py3-none-any.whl"
    seen: list[list[str]] = []
    monkeypatch.setattr(registries, "PIP_WHEEL_GLOBS", (str(tmp_path / "none-*.whl"),))
    monkeypatch.setattr(registries, "_stdout", lambda argv: seen.append(argv) or "a.test b.test")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert registries.pypi_hosts([wheel]) == ["a.test", "b.test"]
    assert seen[-1][-1] == str(wheel)
