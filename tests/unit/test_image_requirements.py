"""image/runtime-requirements.txt (the image's venv, installed with --no-deps) against
pyproject.toml and mitmproxy's declared dependencies: nothing needed is missing,
nothing left out is pinned, every pin is what the dev venv tests."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.harness.imagereqs import canonical, left_out, pinned

REPO = Path(__file__).resolve().parents[2]
#: The image: Debian bookworm's Python on Linux.
IMAGE_ENV = {**default_environment(), "python_version": "3.11", "sys_platform": "linux",
             "os_name": "posix", "platform_system": "Linux"}  # fmt: skip


def applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({**IMAGE_ENV, "extra": ""})


def test_every_pyproject_requirement_is_pinned_and_satisfied() -> None:
    pins = pinned()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        if not applies(req):
            continue
        name = canonical(req.name)
        assert name in pins, f"image/runtime-requirements.txt: pin {req.name} ({text})"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def test_the_closure_is_complete_less_what_is_left_out() -> None:
    """Every dependency of a pinned distribution (as installed in the dev venv) is
    pinned too, unless left out on purpose; nothing left out is pinned."""
    pins, out = pinned(), left_out()
    assert out, "no `# left out:` lines"
    assert not out & set(pins), out & set(pins)
    missing = []
    for name in pins:
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if applies(req) and canonical(req.name) not in set(pins) | out:
                missing.append(f"{name} needs {text}")
    assert not missing, missing


def test_pins_are_the_versions_the_tests_run() -> None:
    differ = {
        name: (version, metadata.version(name))
        for name, version in pinned().items()
        if metadata.version(name) != version
    }
    assert not differ, (
        f"image/runtime-requirements.txt vs this venv: {differ}: scripts/bootstrap installs "
        "with the pins as constraints; update the pins (and rebuild the image) or the venv"
    )
