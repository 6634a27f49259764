"""Console scripts of the container programs: imported with the GC paused, then run
with it on; every one of them goes through runtime.container.launch."""

from __future__ import annotations

import gc
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.container import launch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "launch_probe.py").write_text(
        "import gc\nCOLLECTOR_ON_AT_IMPORT = gc.isenabled()\n"
        "def main():\n    return gc.isenabled()\n"
    )
    (tmp_path / "launch_broken.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "launch_probe"
    for name in ("launch_probe", "launch_broken"):
        sys.modules.pop(name, None)
    gc.unfreeze()


def test_imports_with_the_collector_paused_runs_with_it_on(probe_module: str) -> None:
    assert gc.isenabled()
    main = launch.load(f"{probe_module}:main")
    assert sys.modules[probe_module].COLLECTOR_ON_AT_IMPORT is False
    assert main() is True and gc.isenabled()
    assert gc.get_freeze_count() > 0  # what the import made is out of the collections


def test_an_import_that_fails_still_turns_the_collector_back_on(probe_module: str) -> None:
    with pytest.raises(ImportError, match="broken on purpose"):
        launch.load("launch_broken:main")
    assert gc.isenabled()


def test_every_container_program_starts_through_launch_and_resolves() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    container = {name: target for name, target in scripts.items() if name != "copilot_here"}
    assert len(container) == 7
    for name, target in container.items():
        module, _, function = target.partition(":")
        assert module == "runtime.container.launch", name
        assert callable(getattr(launch, function)), name
    # Each named target exists (imported here without running it).
    for target in (
        "runtime.container.init:entrypoint",
        "runtime.container.interceptor.main:main",
        "runtime.container.reloader:main",
        "runtime.container.logguard:main",
        "runtime.container.dnsguard:main",
        "runtime.container.portkeeper:main",
        "firewall.cli:main",
        "supervisor.supervisord:main",
    ):
        assert callable(launch.load(target)), target
    gc.unfreeze()


def test_supervisord_runs_as_a_module_with_its_own_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "runtime.container.launch", "supervisord", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()[0].isdigit()  # supervisord's version: it parsed --version
    bad = subprocess.run(
        [sys.executable, "-m", "runtime.container.launch", "nothing"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0 and "usage" in bad.stderr


# -- the init's `prepared` marker: supervised programs start once it exists ---------


def test_a_supervised_program_runs_only_once_the_init_has_prepared(
    probe_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    marker = tmp_path / "prepared"
    monkeypatch.setenv(launch.PREPARED_ENV, str(marker))
    ran: list[bool] = []
    runner = threading.Thread(target=lambda: ran.append(launch.service(f"{probe_module}:main")))
    runner.start()
    runner.join(0.3)
    assert runner.is_alive() and not ran  # imported, waiting: the init has not prepared
    marker.touch()
    runner.join(5)
    assert ran == [True]
    gc.unfreeze()


def test_no_marker_in_time_is_a_failed_start(
    probe_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(launch.PREPARED_ENV, str(tmp_path / "never"))
    monkeypatch.setattr(launch, "PREPARED_TIMEOUT", 0.1)
    with pytest.raises(SystemExit, match="did not appear within"):
        launch.service(f"{probe_module}:main")
    gc.unfreeze()


def test_a_program_run_by_hand_does_not_wait(
    probe_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(launch.PREPARED_ENV, raising=False)
    assert launch.service(f"{probe_module}:main") is True
    gc.unfreeze()
