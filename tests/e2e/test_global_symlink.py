"""A global config kept in dotfiles (`~/.copilot_here/network.json` a symlink) is the
one the container enforces: read through the link on the host, approved by content,
mounted by the directory of the file it points to. `copilot_here --engine sandbox`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness.sandbox import Internet, enforce, run_cli, sh

pytestmark = pytest.mark.e2e


PROBE = """
( curl -s -o /dev/null --max-time 10 -w 'api %{http_code}' https://api.github.com/x; echo )
( curl -s -o /dev/null --max-time 10 -w 'evil %{http_code}' https://evil.test/x; echo )
( grep -c api.github.com /home/appuser/.copilot_here/network.json | sed 's/^/seen /' )
echo END
"""


def test_a_symlinked_global_config_is_enforced(internet: Internet) -> None:
    base = Path(tempfile.mkdtemp(prefix="sp-gsym-run-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        project, home, state = base / "project", base / "home", base / "state"
        for d in (project, home):
            d.mkdir(mode=0o777)
        target = base / "dotfiles" / "copilot_here" / "network.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(enforce("api.github.com"), indent=2) + "\n")
        (home / ".copilot_here").mkdir()
        (home / ".copilot_here" / "network.json").symlink_to(target)
        env = {"HOME": str(home), "XDG_STATE_HOME": str(state)}
        r = run_cli(project, ["--", *sh(PROBE)], internet, env=env)
        assert r.returncode == 0, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert {"api 200", "evil 403", "seen 1", "END"} <= set(lines), r.stdout
        assert (home / ".copilot_here" / "network.json").is_symlink()
    finally:
        shutil.rmtree(base, ignore_errors=True)
