"""The host logs directory and the hand-over at exit, end to end (`copilot_here --engine
sandbox`): the agent can neither point /logs at a host directory of its choice nor
outlive the run to write to the log once it is handed to the host user.

Each test has its own HOME and XDG_STATE_HOME. The CLI runs as root here, so
PUID:PGID is 0:0 and the command runs as uid 1000: a background process of the
command that outlived the hand-over would see the log's owner change to 0, and
says so in a file in the project (for a host user whose uid the command runs
with, that is the moment it could start writing to the log).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import python_bin
from tests.harness.sandbox import (
    Session,
    cli_argv,
    cli_env,
    enforce,
    host_logs,
    run_cli,
    sh,
    write_config,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "state")}


def snapshot(path: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Owner, group, mode and content (files) of everything under path, path included."""
    out = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        st = os.lstat(entry)
        content = entry.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(entry.relative_to(path))] = (st.st_uid, st.st_gid, st.st_mode, content)
    return out


def victim(base: Path) -> Path:
    """A host directory the agent would like to own."""
    path = base / "victim"
    path.mkdir()
    (path / "secret").write_text("host data\n")
    os.chmod(path / "secret", 0o600)
    os.chmod(path, 0o700)
    for p in (path, path / "secret"):
        os.chown(p, 7000, 7000)
    return path


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


# --------------------------------------------------------------------------- (a) no symlinks


def test_symlink_at_the_default_logs_location_is_refused(project, env, tmp_path):
    target = victim(tmp_path)
    before = snapshot(target)
    logs = host_logs(project, env)
    logs.parent.mkdir(parents=True)
    logs.symlink_to(target)
    # The old default location, inside the project, is not used at all any more.
    (project / ".copilot_here").mkdir()
    (project / ".copilot_here" / "logs").symlink_to(target)
    r = run_cli(project, ["--", "echo", "SHOULD-NOT-RUN"], env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "SHOULD-NOT-RUN" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, and no container output at all
    assert f"{logs} is a symlink; remove it" in lines[0], r.stderr
    assert snapshot(target) == before


def test_logs_dir_through_a_symlink_is_refused(project, env, tmp_path):
    target = victim(tmp_path)
    before = snapshot(target)
    link = tmp_path / "chosen"
    link.symlink_to(target)
    for chosen in (link, link / "sub"):
        r = run_cli(project, ["--logs-dir", str(chosen), "--", "echo", "SHOULD-NOT-RUN"], env=env)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "SHOULD-NOT-RUN" not in r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert f"--logs-dir {chosen}: {link} is a symlink" in lines[0], r.stderr
        assert snapshot(target) == before


# --------------------------------------------------------------------------- (b) leftovers

FORGER = r"""
import os, signal, sys, time
token, out = sys.argv[1], sys.argv[2]
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)  # double fork: the command does not wait for it, init inherits it
seen = set()
def note(word):
    if word not in seen:
        seen.add(word)
        with open(out, "a") as handle:
            handle.write(word + "\n")
note("STARTED")
log = "/logs/traffic.jsonl"
guard = os.stat(log).st_uid  # proxy-user's, while the run lasts
end = time.monotonic() + 8
while time.monotonic() < end:
    if os.stat(log).st_uid != guard:
        note("SURVIVED-HANDOVER")
    try:
        with open(log, "a") as handle:
            handle.write('{"forged": "%s"}\n' % token)
        note("APPENDED")
    except OSError:
        pass
    try:
        open("/logs/forged-" + token, "w").close()
        note("CREATED")
    except OSError:
        pass
    time.sleep(0.005)
note("ENDED")
"""

SH_FORGER = (
    "trap '' TERM HUP INT; while :; do echo '{\"forged\": \"sh\"}' >> /logs/traffic.jsonl; "
    "touch /logs/forged-sh; sleep 0.05; done"
)


def _processes_with(token: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


LOG_ONLY = {"enabled": False, "log_to_file": True}  # a log to hand over, no lock needed


def test_background_processes_of_the_command_die_before_the_hand_over(project, env):
    write_config(project, LOG_ONLY, state=env["XDG_STATE_HOME"])
    token = "forger-" + secrets.token_hex(4)
    out = project / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    script = "\n".join(
        [
            f"{python_bin()} -c {shlex.quote(FORGER)} {token} /work/out/py",
            f'setsid nohup sh -c "$SH_FORGER" {token} >/dev/null 2>&1 &',
            "sleep 0.3",  # both are up and polling
            "echo LAUNCHED",
        ]
    )
    r = run_cli(
        project,
        ["--", "env", f"SH_FORGER={SH_FORGER}", *sh(script)],
        env=env,
    )
    logs = host_logs(project, env)
    assert r.returncode == 0, r.stderr
    assert "LAUNCHED" in r.stdout, (r.stdout, r.stderr)
    notes = (out / "py").read_text().split()
    assert "STARTED" in notes, notes  # the probe ran
    assert "SURVIVED-HANDOVER" not in notes, notes
    assert "APPENDED" not in notes and "CREATED" not in notes, notes
    assert "ENDED" not in notes, notes  # killed, not finished
    assert "forged" not in (logs / "traffic.jsonl").read_text()
    assert sorted(p.name for p in logs.iterdir()) == ["traffic.jsonl"]
    assert owner(logs) == owner(logs / "traffic.jsonl") == (os.getuid(), os.getgid())
    time.sleep(0.2)
    assert _processes_with(token) == []


# --------------------------------------------------------------------------- (c) hand-over

PLANT = r"""
try_() {
  name=$1; shift
  if "$@" >/dev/null 2>&1; then echo "$name:ALLOWED"; else echo "$name:denied"; fi
}
try_ file touch /logs/agent-file
try_ dir mkdir /logs/agent-dir
try_ link ln -s /work/victim /logs/agent-link
try_ rename mv /logs/traffic.jsonl /logs/old.jsonl
echo UP
while [ ! -e /work/release ]; do sleep 0.05; done
echo DONE
"""


def test_hand_over_gives_only_the_runtimes_files_to_the_host_user(project, env, tmp_path):
    write_config(project, LOG_ONLY, state=env["XDG_STATE_HOME"])
    target = victim(project)
    before = snapshot(target)
    logs = tmp_path / "chosen" / "logs"  # --logs-dir, created by the CLI
    lines: list[str] = []
    with Session(project, ["--logs-dir", str(logs), "--", *sh(PLANT)], env=env) as s:
        while (line := s.next_line()) != "UP":
            assert line is not None, s.stderr
            lines.append(line)
        # While the run lasts both belong to proxy-user (not the host user).
        assert owner(logs)[0] != os.getuid() and owner(logs / "traffic.jsonl")[0] != os.getuid()
        # What the agent could not plant, somebody else did (the host side, as root).
        planted = logs / "planted"
        planted.write_text("p")
        os.chown(planted, 4242, 4242)
        (logs / "planted-dir").mkdir()
        (logs / "planted-dir" / "f").write_text("f")
        for p in (logs / "planted-dir", logs / "planted-dir" / "f"):
            os.chown(p, 4242, 4242)
        (logs / "planted-link").symlink_to(target)
        os.chown(logs / "planted-link", 4242, 4242, follow_symlinks=False)
        (project / "release").touch()
        assert s.wait(timeout=30) == 0, s.stderr
        while (line := s.next_line()) is not None:
            lines.append(line)
    verdicts = dict(line.split(":", 1) for line in lines if ":" in line)
    assert "DONE" in lines, lines
    assert verdicts == {n: "denied" for n in ("file", "dir", "link", "rename")}, lines
    assert owner(logs) == owner(logs / "traffic.jsonl") == (os.getuid(), os.getgid())
    for p in (planted, logs / "planted-dir", logs / "planted-dir" / "f", logs / "planted-link"):
        assert owner(p) == (4242, 4242), p
    assert snapshot(target) == before


# --------------------------------------------------------------------------- (d) the project


def test_a_run_creates_nothing_in_the_project_and_says_where_the_log_is(project, env):
    write_config(project, enforce("api.github.com"), state=env["XDG_STATE_HOME"])
    before = snapshot(project)
    r = run_cli(project, ["--", "true"], env=env)
    assert r.returncode == 0, r.stderr
    assert snapshot(project) == before
    assert not (project / ".copilot_here" / "logs").exists()
    logs = host_logs(project, env)
    expected = f"[Network] Traffic log: /logs/traffic.jsonl (on the host: {logs}/traffic.jsonl)"
    assert expected in r.stderr.splitlines(), r.stderr
    assert (logs / "traffic.jsonl").is_file()
    show = run_cli(project, ["--network-show"], env=env)
    assert f"Traffic log on the host: {logs}/traffic.jsonl" in show.stdout, show.stdout
    assert json.loads((project / ".copilot_here" / "network.json").read_text())["enabled"]


# --------------------------------------------------------------------------- (e) a failed start

#: argv prefix: the CLI in a mount namespace of its own (the sandbox's is a copy of it)
#: where the directory given first is a read-only bind mount of itself.
READ_ONLY = [
    *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
    'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
]


def init_trace(stderr: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if line.startswith("[init +")]


def test_a_file_the_start_up_cannot_write_ends_it_with_the_services_stopped(project, env, tmp_path):
    """The init starts supervisord before it writes what the services read (the CA, the
    policy, /logs): one of them that cannot be written (here /logs, read-only) ends the
    start as any failure does: one line naming it, supervisord and its services stopped
    before the init exits, exit 1, no command; not a traceback."""
    write_config(project, enforce("api.github.com"), state=env["XDG_STATE_HOME"])
    logs = tmp_path / "read-only-logs"
    logs.mkdir()
    before = snapshot(logs)
    argv = [*READ_ONLY, str(logs)]
    argv += cli_argv(["--logs-dir", str(logs), "--", "echo", "SHOULD-NOT-RUN"])
    r = subprocess.run(
        argv,
        cwd=project,
        env=cli_env({**env, "SECURE_PROXY_TRACE": "1"}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "SHOULD-NOT-RUN" not in r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    failed = "[Network] The start-up failed, the command was not started: "
    assert failed + "[Errno 30] Read-only file system: '/logs'" in r.stderr.splitlines(), r.stderr
    steps = init_trace(r.stderr)
    assert "supervisord started" in steps and steps[-1] == "supervisord stopped", steps
    assert snapshot(logs) == before


@pytest.mark.parametrize("planted", ["directory", "hard link"])
def test_a_log_the_hand_over_could_not_give_back_is_refused_before_logs_changes_hands(
    project, env, tmp_path, planted
):
    """A directory, or a file with another link (here a host file of the user's), at the
    log's place: prepare would give /logs (and the other link's file) to proxy-user and
    the hand-over refuses such a log, so /logs would stay proxy-user's and the next run
    be refused. Refused first, with nothing changed."""
    write_config(project, enforce("api.github.com"), state=env["XDG_STATE_HOME"])
    logs = tmp_path / "logs"
    logs.mkdir()
    other = tmp_path / "elsewhere.txt"
    if planted == "directory":
        (logs / "traffic.jsonl").mkdir()
        what = "is a directory"
    else:
        other.write_text("the user's own file\n")
        os.link(other, logs / "traffic.jsonl")
        what = "has 2 hard links"

    def state() -> tuple[object, ...]:
        return snapshot(logs), other.exists() and (*owner(other), os.lstat(other).st_nlink)

    before = state()
    r = run_cli(project, ["--logs-dir", str(logs), "--", "echo", "SHOULD-NOT-RUN"], env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "SHOULD-NOT-RUN" not in r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    named = f"[Network] /logs/traffic.jsonl (on the host: {logs}/traffic.jsonl) {what}"
    assert named in r.stderr, r.stderr
    # Nothing changed hands (the other link's file included): the next run may use it.
    assert state() == before
    if planted == "directory":
        (logs / "traffic.jsonl").rmdir()
    else:
        (logs / "traffic.jsonl").unlink()
    again = run_cli(project, ["--logs-dir", str(logs), "--", "echo", "RAN"], env=env)
    assert again.returncode == 0 and again.stdout.split() == ["RAN"], again.stderr
    assert owner(logs) == owner(logs / "traffic.jsonl") == (os.getuid(), os.getgid())
