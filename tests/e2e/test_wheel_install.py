"""copilot_here installed from a wheel (`pip install`, not editable, not a checkout) runs
the sandbox engine: the runtime is laid out from the installation the CLI runs from
(its site-packages: runtime/_config, runtime/_supervisor, the dist-info's scripts).

The venv is made with Debian's /usr/bin/python3 outside /root, as a user's would be,
so proxy-user and appuser inside the sandbox can execute it. There is no package
index here: the wheel is installed with --no-deps, and the dependencies come from the
test venv through a .pth line (a plain path: nothing of that venv's own packages, ours
included, is imported from it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.sandbox import Internet, enforce, sh, write_config

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
WHEEL_INPUTS = ("runtime", "firewall", "config", "supervisor.d", "pyproject.toml", "README.md")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, **kw)
    assert r.returncode == 0, f"{argv}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel_venv() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sp-wheel-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        src = base / "src"  # a copy: pip builds in the tree it is given
        src.mkdir()
        for name in WHEEL_INPUTS:
            path = REPO_ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(path, src / name)
        wheels = base / "wheels"
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index"]
        _run([*pip_wheel, "--no-build-isolation", "-w", str(wheels), str(src)])
        venv = base / "venv"
        _run(["/usr/bin/python3", "-m", "venv", str(venv)])
        wheel = next(wheels.glob("copilot_here_secure_proxy-*.whl"))
        _run([str(venv / "bin/pip"), "install", "-q", "--no-index", "--no-deps", str(wheel)])
        site = next(venv.glob("lib/python3*/site-packages"))
        deps = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
        (site / "sp-test-deps.pth").write_text(f"{deps}\n")
        shutil.rmtree(src)
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)


PROBE = """
( curl -sS --max-time 10 https://api.github.com/from-wheel; echo ) | sed 's/^/ALLOWED /'
( curl -s -o /dev/null --max-time 10 -w '%{http_code}' https://evil.test/x; echo ) \\
  | sed 's/^/BLOCKED /'
( printf 'MANIFEST '; tr -d '\\n' < /opt/secure-proxy/install.json; echo )
echo END
"""


def test_a_wheel_install_runs_the_sandbox_engine(wheel_venv: Path, internet: Internet) -> None:
    base = Path(tempfile.mkdtemp(prefix="sp-wheel-run-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        project, home, state = base / "project", base / "home", base / "state"
        for d in (project, home):
            d.mkdir(mode=0o777)
        write_config(project, enforce("api.github.com"), state=str(state))
        # The CLI as a user runs it: its own venv's script, no checkout on the path.
        cli = wheel_venv / "bin" / "copilot_here"
        argv = [str(cli), "--engine", "sandbox", "--sandbox-netns", internet.topo.net]
        for name, ip in internet.add_hosts().items():
            argv += ["--add-host", f"{name}:{ip}"]
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "XDG_STATE_HOME": str(state),
            "LANG": "C.UTF-8",
            **internet.env(),
        }
        where = subprocess.run(
            [str(wheel_venv / "bin/python"), "-c", "import runtime; print(runtime.__file__)"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert where.startswith(str(wheel_venv)), where
        r = subprocess.run(
            [*argv, "--", *sh(PROBE)],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert "END" in lines, r.stdout
        allowed = json.loads(next(x for x in lines if x.startswith("ALLOWED "))[8:])
        assert (allowed["host"], allowed["path"]) == ("api.github.com", "/from-wheel"), allowed
        assert "BLOCKED 403" in lines, r.stdout
        manifest = json.loads(next(x for x in lines if x.startswith("MANIFEST "))[9:])
        site = str(next(wheel_venv.glob("lib/python3*/site-packages")))
        assert manifest["source"] == site, manifest
        assert manifest["venv"] == f"reused {wheel_venv}", manifest
    finally:
        shutil.rmtree(base, ignore_errors=True)
