"""From monitor to enforce without editing JSON, end to end (`copilot_here --engine sandbox`):
a monitor run, the log and its summary, rules suggested from it and written, the mode
switched, and an enforce run in which what the agent did before passes and anything
new is blocked, checked on the upstream's side (its own record of what reached it)
and in the log.

With SP_TRANSCRIPT=FILE the commands and what they printed are written to FILE (the
README's "From nothing to enforcement" shows such a transcript).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import python_bin
from tests.harness.sandbox import NAMES, Internet, run_cli, sh
from tests.harness.upstream import UpstreamCA, read_records, wait_ready

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def internet(module_topology, staged_source) -> Iterator[tuple[Internet, Path]]:
    """The test internet, recording every request that reaches it."""
    work = Path(tempfile.mkdtemp(prefix="sp-m2e-", dir="/tmp"))
    os.chmod(work, 0o755)
    ca = UpstreamCA.create(work / "ca", names=list(NAMES))
    records = work / "upstream.jsonl"
    proc = module_topology.net_popen(
        [
            *(python_bin(), "-m", "tests.harness.upstream", "serve"),
            *("--cert", str(ca.server_cert), "--key", str(ca.server_key)),
            *("--record", str(records)),
        ],
        env={"PYTHONPATH": staged_source},
        text=True,
    )
    wait_ready(proc)
    yield Internet(module_topology, ca, proc), records
    module_topology.stop(proc)
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class World:
    project: Path
    home: Path
    state: Path
    transcript: list[str] = field(default_factory=list)

    def cli(self, args: list[str], internet: Internet | None = None):
        r = run_cli(
            self.project,
            args,
            internet,
            timeout=120,
            env={"HOME": str(self.home), "XDG_STATE_HOME": str(self.state)},
        )
        if internet is None:  # the commands a user types (a run's argv has test plumbing)
            shown = " ".join(args)
            self.transcript.append(f"$ copilot_here {shown}\n{r.stdout}{r.stderr}")
        return r


@pytest.fixture
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="sp-m2e-w-", dir="/tmp"))
    os.chmod(base, 0o755)
    w = World(base / "project", base / "home", base / "state")
    for path in (w.project, w.home):
        path.mkdir()
    os.chmod(w.project, 0o777)
    yield w
    if os.environ.get("SP_TRANSCRIPT"):
        Path(os.environ["SP_TRANSCRIPT"]).write_text(
            "\n".join(w.transcript).replace(str(base), "~")
        )
    shutil.rmtree(base, ignore_errors=True)


def fetch(url: str, tag: str, method: str = "GET") -> str:
    """curl in its own subshell: one line `TAG <status> <body>`."""
    body = f"/tmp/body.{tag}"
    return (
        f"( c=$(curl -s -X {method} -o {body} -w '%{{http_code}}' --max-time 5 {url}); "
        f"echo \"{tag} $c $(tr '\\n' ' ' < {body})\" )"
    )


def status(stdout: str, tag: str) -> str:
    (line,) = [x for x in stdout.splitlines() if x.startswith(tag + " ")]
    return line.split(" ")[1]


def arrived(records: Path, since: float) -> set[tuple[str, str]]:
    """(method, path) of every request the upstream itself received since `since`."""
    return {
        (r["method"], r["path"])
        for r in read_records(records)
        if r.get("ev") == "request" and r["t"] >= since
    }


BEFORE = [
    ("DOCS_A", "https://example.com/docs/a", "GET"),
    ("DOCS_B", "https://example.com/docs/b", "GET"),
    ("ZEN", "https://api.github.com/zen", "GET"),
    ("UPLOAD", "https://example.com/upload", "POST"),  # a write: flagged, not applied
]
NEW = [
    ("EVIL", "https://evil.test/new", "GET"),
    ("OTHER", "https://example.com/other", "GET"),
]


def end_of_run(stderr: str) -> list[str]:
    """The CLI's line after the run (the init's start-up lines say [Network] too)."""
    return [x for x in stderr.splitlines() if x.startswith("[Network] ") and " this run: " in x]


def agent(requests: list[tuple[str, str, str]]) -> list[str]:
    return sh("; ".join([*(fetch(u, t, m) for t, u, m in requests), "echo END"]))


def test_from_monitor_to_enforce_without_editing_json(internet, world: World) -> None:
    net, records = internet
    assert world.cli(["--network-init"]).returncode == 0
    r = world.cli(["--network-enable"])
    assert r.returncode == 0 and "Mode now in force: monitor" in r.stdout, r.stderr

    # 1. A monitor run: everything goes through, and is logged.
    t0 = time.time()
    r = world.cli(["--", *agent(BEFORE)], net)
    assert r.returncode == 0, r.stderr
    assert "END" in r.stdout, r.stdout
    for tag, _, _ in BEFORE:
        assert status(r.stdout, tag) == "200", r.stdout
    assert arrived(records, t0) >= {("GET", "/docs/a"), ("POST", "/upload"), ("GET", "/zen")}
    (line,) = [
        x for x in r.stderr.splitlines() if x.startswith("[Network] ") and " this run: " in x
    ]
    assert line.startswith(
        "[Network] 4 flagged (monitor) this run: example.com x3, api.github.com. "
        "See: copilot_here --network-logs --blocked --violations --since "
    ), r.stderr
    world.transcript.append(f"$ copilot_here   # the agent's run, in monitor mode\n...\n{line}\n")

    # 2. The log, and per host.
    r = world.cli(["--network-logs"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    assert re.search(r"VIOLATION GET     example\.com/docs/a  host_not_allowed 200$", lines[0])
    assert re.search(r"VIOLATION POST    example\.com/upload  host_not_allowed 200$", lines[3])
    assert "path_not_allowed 200 (rule: api.github.com)" in lines[2]
    r = world.cli(["--network-logs", "--summary"])
    assert r.stdout.startswith("example.com: 3 requests, 0 blocked, 3 violations"), r.stdout
    assert "        1  /upload" in r.stdout

    # 3. Rules from the log: the reads are written, the write is flagged and left out.
    r = world.cli(["--network-suggest", "--apply"])
    assert r.returncode == 0, r.stderr
    assert "      ! allows writes (POST)" in r.stdout
    assert "Not applied (1, they widen access): example.com" in r.stdout
    config = world.project / ".copilot_here" / "network.json"
    rules = json.loads(config.read_text())["allowed_rules"]
    assert {"host": "example.com", "allowed_paths": ["/docs/a", "/docs/b"], "methods": ["GET"]} in (
        rules
    )
    assert {"host": "api.github.com", "allowed_paths": ["/zen"], "methods": ["GET"]} in rules
    assert not any(r.get("methods") == ["POST"] and r["host"] == "example.com" for r in rules)
    r = world.cli(["--network-replay"])
    assert r.returncode == 0 and "Would now be ALLOWED (3):" in r.stdout, r.stdout

    # 4. Enforce.
    r = world.cli(["--network-mode", "enforce"])
    assert r.returncode == 0, r.stderr
    world.transcript.append(
        "$ copilot_here --network-show | head -3\n"
        + "".join(f"{x}\n" for x in world.cli(["--network-show"]).stdout.splitlines()[:3])
    )
    world.transcript.pop(-2)  # the full --network-show: only its head is shown

    # 5. An enforce run: what the agent did before passes, anything new is blocked.
    t1 = time.time()
    r = world.cli(["--", *agent([*BEFORE, *NEW])], net)
    assert r.returncode == 0, r.stderr
    assert "END" in r.stdout, r.stdout
    for tag in ("DOCS_A", "DOCS_B", "ZEN"):
        assert status(r.stdout, tag) == "200", r.stdout
    for tag in ("UPLOAD", "EVIL", "OTHER"):
        assert status(r.stdout, tag) == "403", r.stdout
    got = arrived(records, t1)
    assert {("GET", "/docs/a"), ("GET", "/docs/b"), ("GET", "/zen")} <= got, got
    assert not got & {("POST", "/upload"), ("GET", "/new"), ("GET", "/other")}, got
    (line,) = [
        x for x in r.stderr.splitlines() if x.startswith("[Network] ") and " this run: " in x
    ]
    assert line.startswith("[Network] 3 blocked this run: example.com x2, evil.test. See: ")
    world.transcript.append(f"$ copilot_here   # the agent's run, enforced\n...\n{line}\n")
    r = world.cli(["--network-logs", "--blocked"])
    blocked = r.stdout.splitlines()
    assert len(blocked) == 3, r.stdout
    assert any(
        re.search(r"BLOCK     GET     evil\.test/new  host_not_allowed 403$", x) for x in blocked
    )


AIRLOCK = {
    "enabled": True,
    "enable_logging": True,
    "inherit_default_rules": False,
    "mode": "enforce",
    "allowed_rules": [
        {"host": "example.com", "allowed_paths": ["/docs*", "/exact"]},
        {"host": "evil.test", "allowed_paths": ["*"], "allow_insecure": True},
        {"host": "api.github.com", "allowed_paths": []},
    ],
}
# (tag, url, status): the Airlock file as this project reads it, the narrower way.
AIRLOCK_CASES = [
    ("PREFIX", "https://example.com/docs/x", "200"),
    ("RAWPREFIX", "https://example.com/docs-old", "403"),  # Airlock's raw prefix: not here
    ("EXACT", "https://example.com/exact", "200"),
    ("BELOW", "https://example.com/exact/below", "403"),  # exact there, exact here
    ("PLAIN", "http://example.com/docs/x", "403"),  # no allow_insecure: https only
    ("INSECURE", "http://evil.test/x", "200"),  # allow_insecure: true
    ("NOPATH", "https://api.github.com/user", "403"),  # [] is no path
]


def test_copilot_heres_airlock_configs_are_enforced_as_read(internet, world: World) -> None:
    net, records = internet
    airlock = world.home / ".config" / "copilot_here" / "network.json"
    airlock.parent.mkdir(parents=True)
    airlock.write_text(json.dumps(AIRLOCK, indent=2))
    (airlock.parent / "docker-broker.json").write_text("{}")  # copilot_here's: never mounted
    r = world.cli(["--network-show"])
    assert "copilot_here's global Airlock config" in r.stdout and "Format: Airlock" in r.stdout
    probe = "( ls /home/appuser/.copilot_here > /tmp/ls; echo \"LS $(tr '\\n' ' ' < /tmp/ls)\" )"
    requests = [(t, u, "GET") for t, u, _ in AIRLOCK_CASES]
    script = sh("; ".join([probe, *(fetch(u, t, m) for t, u, m in requests), "echo END"]))
    for round_ in ("global", "repo"):
        t0 = time.time()
        r = world.cli(["--", *script], net)
        assert r.returncode == 0 and "END" in r.stdout, (r.stdout, r.stderr)
        for tag, _, expected in AIRLOCK_CASES:
            assert status(r.stdout, tag) == expected, (round_, tag, r.stdout)
        got = arrived(records, t0)
        assert got == {("GET", "/docs/x"), ("GET", "/exact"), ("GET", "/x")}, (round_, got)
        # Only the native translation is mounted, never copilot_here's directory.
        (ls,) = [x.strip() for x in r.stdout.splitlines() if x.startswith("LS")]
        assert ls == ("LS network.json" if round_ == "global" else "LS"), r.stdout
        # The same file as a repo config, read in the container by its keys.
        repo = world.project / ".copilot_here" / "network.json"
        repo.parent.mkdir(exist_ok=True)
        repo.write_text(json.dumps(AIRLOCK, indent=2))
        assert world.cli(["--network-trust"]).returncode == 0
