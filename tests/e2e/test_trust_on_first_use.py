"""The agent cannot choose the policy of a later run: `copilot_here --engine sandbox`.

Each test has its own HOME (global config) and XDG_STATE_HOME (approvals), so the
only trust state is the one the test makes. The project is writable by the
container's appuser (uid 1000 here: the CLI runs as root) and its
`.copilot_here/` too, as a user's own project is for the user's own agent: what
keeps the agent out must be the mount, not file modes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.sandbox import Internet, enforce, run_cli, sh

pytestmark = pytest.mark.e2e

TRUST = "copilot_here --network-trust"


@dataclass
class World:
    project: Path
    home: Path
    state: Path
    logs: Path

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "XDG_STATE_HOME": str(self.state)}

    @property
    def repo_file(self) -> Path:
        return self.project / ".copilot_here" / "network.json"

    @property
    def global_file(self) -> Path:
        return self.home / ".copilot_here" / "network.json"

    def cli(self, args: list[str], internet: Internet | None = None):
        # Logs outside the project: nothing of the CLI's own makes .copilot_here.
        return run_cli(self.project, ["--logs-dir", str(self.logs), *args], internet, env=self.env)

    def write_global(self, data: dict) -> Path:
        """The user's own global config, written by hand (no approval record),
        writable by the container's appuser as the user's file is for the user."""
        path = self.global_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(path.parent, 0o777)
        os.chmod(path, 0o666)
        return path


@pytest.fixture
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="sp-tw-", dir="/tmp"))
    os.chmod(base, 0o755)
    w = World(base / "project", base / "home", base / "state", base / "logs")
    for path in (w.project, w.home):
        path.mkdir()
    os.chmod(w.project, 0o777)
    yield w
    shutil.rmtree(base, ignore_errors=True)


def fetch(url: str, tag: str) -> str:
    """curl in its own subshell: one line `TAG <status> <body>` (the upstream echoes
    what it got; a block is the interceptor's 403)."""
    body = f"/tmp/body.{tag}"
    return (
        f"( c=$(curl -s -o {body} -w '%{{http_code}}' --max-time 5 {url}); "
        f"echo \"{tag} $c $(tr '\\n' ' ' < {body})\" )"
    )


def probe(name: str, command: str) -> str:
    """One tamper attempt in its own subshell: NAME:DONE (it worked) or NAME:denied."""
    return f"( {command} ) >/dev/null 2>&1 && echo {name}:DONE || echo {name}:denied"


def lines(stdout: str, tag: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(tag)]


def status(stdout: str, tag: str) -> str:
    (line,) = lines(stdout, tag)
    return line.split(" ")[1]


def arrived(stdout: str, tag: str, path: str) -> bool:
    """The upstream's own echo of `path` came back (not the interceptor's 403)."""
    (line,) = lines(stdout, tag)
    return status(stdout, tag) == "200" and f'"path": "{path}"' in line


PLANT = "; ".join(
    [
        probe("plant", "echo '{\"enabled\": false}' > /work/.copilot_here/network.json"),
        probe("move", "mv /work/.copilot_here /work/.copilot_here.old"),
        probe("delete", "rmdir /work/.copilot_here"),
        "echo END",
    ]
)


def test_agent_cannot_plant_a_repo_config_and_a_planted_one_waits_for_approval(
    internet: Internet, world: World
) -> None:
    gfile = world.write_global(enforce("api.github.com"))
    # The project's own .copilot_here is the user's and writable by the agent's uid:
    # only the read-only mount over it can keep the agent out.
    (world.project / ".copilot_here").mkdir()
    os.chmod(world.project / ".copilot_here", 0o777)
    for extra in ([], ["--network-config-write"]):
        script = PLANT + "; " + fetch("https://evil.test/during", "DURING")
        r = world.cli([*extra, "--", *sh(script)], internet)
        assert r.returncode == 0, r.stderr
        assert "END" in r.stdout, r.stdout
        for name in ("plant", "move", "delete"):
            assert lines(r.stdout, name) == [f"{name}:denied"], (extra, r.stdout)
        # The global policy was the one in force: the request never reached evil.test.
        assert status(r.stdout, "DURING") == "403", r.stdout
        assert not arrived(r.stdout, "DURING", "/during")
        assert not world.repo_file.exists()
        assert os.listdir(world.project / ".copilot_here") == []

    # A repository cloned with one (or a file dropped between runs): refused.
    world.repo_file.write_text('{"enabled": false}\n')
    r = world.cli(["--", *sh("echo COMMAND-RAN; " + fetch("https://evil.test/x", "X"))], internet)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "COMMAND-RAN" not in r.stdout
    assert f"the repo config {world.repo_file} is new" in r.stderr
    assert '    {"enabled": false}' in r.stderr and TRUST in r.stderr
    assert json.loads(gfile.read_text()) == enforce("api.github.com")  # not replaced

    t = world.cli(["--network-trust"])
    assert t.returncode == 0, t.stderr
    assert '{"enabled": false}' in t.stdout and f"Approved {world.repo_file}" in t.stdout

    # Approved: that config decides now (rules disabled, no log: the network untouched,
    # so the request meets the upstream's own certificate).
    after = fetch("https://evil.test/after", "AFTER").replace(
        "curl ", "curl --cacert /ca/upstream-ca.pem "
    )
    r = world.cli(["--", *sh(after)], internet)
    assert r.returncode == 0, r.stderr
    assert "[Network] Inactive (repo config /work/.copilot_here/network.json)" in r.stderr
    assert arrived(r.stdout, "AFTER", "/after"), r.stdout


def test_a_writable_global_config_edit_is_live_shown_at_exit_then_needs_approval(
    internet: Internet, world: World
) -> None:
    gfile = world.write_global(enforce("api.github.com"))
    edited = enforce("api.github.com", "example.com")
    agent = "; ".join(
        [
            fetch("https://example.com/before", "BEFORE"),
            # The agent rewrites the policy it runs under (allowed: --network-config-write).
            probe(
                "edit",
                f"echo '{json.dumps(edited)}' > /home/appuser/.copilot_here/network.json",
            ),
            # The reloader applies it within a second or so; try until then.
            "for i in $(seq 40); do "
            "c=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 https://example.com/poll); "
            '[ "$c" = 200 ] && break; sleep 0.1; done',
            fetch("https://example.com/live", "LIVE"),
            probe("plant", "echo '{}' > /work/.copilot_here/network.json"),
            "echo END",
        ]
    )
    r = world.cli(["--network-config-write", "--", *sh(agent)], internet)
    assert r.returncode == 0, r.stderr
    assert "END" in r.stdout, r.stdout
    assert lines(r.stdout, "edit") == ["edit:DONE"], r.stdout
    assert lines(r.stdout, "plant") == ["plant:denied"], r.stdout
    assert status(r.stdout, "BEFORE") == "403", r.stdout
    assert arrived(r.stdout, "LIVE", "/live"), r.stdout  # in force for this run
    # ... and shown at exit, with the command that would make it stick.
    assert f"the global config {gfile} was changed during this run" in r.stderr, r.stderr
    assert '+{"enabled": true, "inherit_defaults": false' in r.stderr, r.stderr
    assert TRUST in r.stderr

    # The next run does not start under the agent's policy.
    r = world.cli(["--", *sh("echo COMMAND-RAN")], internet)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "COMMAND-RAN" not in r.stdout
    assert f"the global config {gfile} changed since you approved it" in r.stderr
    assert '+{"enabled": true' in r.stderr and TRUST in r.stderr

    assert world.cli(["--network-trust"]).returncode == 0
    r = world.cli(["--", *sh(fetch("https://example.com/approved", "OK"))], internet)
    assert r.returncode == 0, r.stderr
    assert arrived(r.stdout, "OK", "/approved"), r.stdout


def test_network_show_says_whether_the_repo_config_is_trusted(world: World) -> None:
    world.repo_file.parent.mkdir()
    world.repo_file.write_text(json.dumps(enforce("api.github.com")))
    r = world.cli(["--network-show"])
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("Trust:")]
    assert "NOT TRUSTED" in line and str(world.repo_file) in line and TRUST in line
    assert world.cli(["--network-trust"]).returncode == 0
    r = world.cli(["--network-show"])
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("Trust:")]
    assert line.startswith(f"Trust: {world.repo_file} is trusted (approved "), line
