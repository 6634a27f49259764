"""The image stage: build the debootstrap base and our image with Podman (cached
layers make a warm run take seconds), then drive containers through the host CLI.

Run as its own stage (it needs root and several minutes cold):
    /opt/sp-venv/bin/python -m pytest -q -p no:cacheprovider tests/image
Podman and debootstrap are installed when missing (CI is root): never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO_ROOT / "image"
TAG = os.environ.get("SP_IMAGE_TAG", "localhost/copilot_here-secure:test")

# This machine: crun refuses the hybrid cgroups and Podman's default RLIMIT_NOFILE
# is above the hard limit (runc: "error setting rlimit type 7"). A containers.conf
# handed to the CLI's podman through CONTAINERS_CONF fixes both without changing
# the host's configuration or the CLI.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
"""


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the image tests need root (podman, network namespaces)", pytrace=False)


def _ensure_tools() -> None:
    missing = [t for t in ("podman", "runc", "debootstrap", "script") if not shutil.which(t)]
    if not missing:
        return
    print(f"[image] installing {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "podman",
            "runc",
            "debootstrap",
            "uidmap",
            "util-linux",
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _timed(label: str, argv: list[str], timeout: float) -> str:
    start = time.monotonic()
    result = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    took = time.monotonic() - start
    print(f"[image] {label}: {took:.1f}s", file=sys.stderr)
    if result.returncode != 0:
        pytest.fail(
            f"{label} failed ({result.returncode}):\n{result.stderr[-6000:]}", pytrace=False
        )
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def base_image() -> str:
    _need_root()
    _ensure_tools()
    return _timed(
        "base (debootstrap + podman import, cached)", [str(IMAGE_DIR / "make-base.sh")], timeout=900
    )


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """Our image on the debootstrap base, Copilot CLI off, this machine's CA for pip."""
    env_base = {"SP_BASE_IMAGE": base_image}
    start = time.monotonic()
    result = subprocess.run(
        [str(IMAGE_DIR / "build.sh"), TAG],
        cwd=REPO_ROOT,
        env={**os.environ, **env_base},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    print(f"[image] podman build: {time.monotonic() - start:.1f}s", file=sys.stderr)
    if result.returncode != 0:
        pytest.fail(f"image build failed:\n{result.stderr[-8000:]}", pytrace=False)
    return TAG


@pytest.fixture(scope="session")
def image_info(image: str) -> dict:
    out = subprocess.run(
        ["podman", "image", "inspect", image], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)[0]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for the host CLI: the checkout's code, this machine's podman settings."""
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SECURE_PROXY_", "PYTEST_")) and k not in ("COLUMNS", "LINES")
    }
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        CONTAINERS_CONF=str(conf),
        PYTHONDONTWRITEBYTECODE="1",
    )
    yield env
