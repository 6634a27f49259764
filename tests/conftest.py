"""Shared fixtures. End-to-end tests need root: without it they fail, never skip."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.harness import Topology, cleanup_leftovers, stage_source  # noqa: E402
from tests.harness.sandbox import Internet  # noqa: E402

_cleaned = False


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, iptables)", pytrace=False)
    global _cleaned
    if not _cleaned:
        cleanup_leftovers()
        _cleaned = True


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh box + net-host pair for one test."""
    _need_root()
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="module")
def module_topology() -> Iterator[Topology]:
    """One box + net-host pair shared by the tests of a module."""
    _need_root()
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="session")
def staged_source() -> Iterator[str]:
    """PYTHONPATH of a world-readable copy of runtime/, firewall/, config/ and the harness."""
    base = Path("/tmp") / f"sp-src-{os.getpid()}"
    path = stage_source(base)
    yield path
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def internet(module_topology: Topology, staged_source: str) -> Iterator[Internet]:
    """A module's test internet (sandbox.Internet): its HTTPS upstream records every
    request that reaches it (`internet.record`). A module with other needs defines its
    own `internet`."""
    work = Path(tempfile.mkdtemp(prefix="sp-net-", dir="/tmp"))
    os.chmod(work, 0o755)
    net = Internet.start(module_topology, work, staged_source, record=work / "record.jsonl")
    yield net
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def project() -> Iterator[Path]:
    """A fresh project directory (world-readable: the sandbox's users traverse it)."""
    path = Path(tempfile.mkdtemp(prefix="sp-proj-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
