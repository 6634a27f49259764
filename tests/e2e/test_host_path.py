"""Programs the host CLI runs, end to end: the agent cannot plant one for the next run.

At every start the CLI runs `git` (the project's origin) and `gh` (the sign-in token)
as the host user (root, for the sandbox engine), found on PATH, from the directory it
was started in: the project, which the agent writes. A PATH with an empty entry (a
stray `:`) or `.` would find the agent's `git` and `gh` there. The agent plants both
during one run; the next run starts with such a PATH; a planted program that ran on
the host would append to a host file the agent named.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.sandbox import enforce, run_cli, sh, write_config

pytestmark = pytest.mark.e2e

SYSTEM = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.mark.parametrize("path", [f":{SYSTEM}", f".:{SYSTEM}", f"{SYSTEM}:"])
def test_programs_the_agent_plants_in_the_project_never_run_on_the_host(
    project: Path, tmp_path: Path, path: str
):
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    os.chmod(project, 0o777)  # the agent writes the project (its uid is the host user's)
    write_config(project, enforce("example.com"))
    ran = tmp_path / "ran-on-the-host"
    plant = "; ".join(
        f"printf '#!/bin/sh\\necho {tool} >> {ran}\\n' > /work/{tool} && chmod 755 /work/{tool}"
        for tool in ("git", "gh")
    )
    first = run_cli(project, ["--", *sh(f"{plant} && echo PLANTED")])
    assert first.returncode == 0, first.stderr
    assert "PLANTED" in first.stdout, (first.stdout, first.stderr)
    assert os.access(project / "git", os.X_OK) and os.access(project / "gh", os.X_OK)
    second = run_cli(project, ["--", "echo", "SECOND-RAN"], env={"PATH": path})
    assert second.returncode == 0, second.stderr
    assert "SECOND-RAN" in second.stdout, (second.stdout, second.stderr)
    assert not ran.exists(), ran.read_text()
