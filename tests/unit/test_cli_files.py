"""The CLI never falls over: every file problem is one line naming the file and the
fix (exit 1), usage mistakes exit 2 and start nothing, the project is found as git
finds it and never is / or the home directory, a symlinked global config works, and
a host without os.getuid (Windows) gets a message instead of a crash. In-process
(main()) in a temporary project, HOME and state dir; --dry-run or no engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from runtime.host import cli as cli_module
from runtime.host import hoststate, run, trust

ROOT = Path(__file__).resolve().parents[2]
TRUST_CMD = "copilot_here --network-trust"


class Env:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
        self.tmp = tmp
        self.project = tmp / "project"
        self.home = tmp / "home"
        self.state = tmp / "state"
        self.project.mkdir()
        self.home.mkdir()
        share = tmp / "share"
        shutil.copytree(ROOT / "config", share)
        (share / "registries.json").write_text('{"npm": ["npm.test"], "pypi": ["pypi.test"]}')
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        monkeypatch.chdir(self.project)
        monkeypatch.setenv("HOME", str(self.home))
        monkeypatch.setenv("XDG_STATE_HOME", str(self.state / "x"))
        monkeypatch.setenv("SECURE_PROXY_SHARE", str(share))
        monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no docker, no podman

    def __call__(self, *args: str) -> tuple[int, str, str]:
        code = cli_module.main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def dry(self, *extra: str) -> tuple[int, str, str]:
        return self("--engine", "docker", "--dry-run", *extra, "--", "true")

    @property
    def repo(self) -> Path:
        return self.project / ".copilot_here" / "network.json"

    @property
    def glob(self) -> Path:
        return self.home / ".copilot_here" / "network.json"

    @property
    def state_root(self) -> Path:
        return hoststate.state_root(self.home)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Env:
    return Env(tmp_path, monkeypatch, capsys)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--network-sh"], "did you mean --network-show?"),
        (["--network-bogus"], "unknown option --network-bogus"),
        (["--network-chek", "https://a.test/"], "did you mean --network-check?"),
        (["--dry-run", "--netwrk-show"], "did you mean --network-show?"),
        (["network-show"], "did you mean --network-show?"),
        (["network-check", "https://a.test/"], "did you mean --network-check?"),
        (["dry-run", "true"], "did you mean --dry-run?"),
        (["--network-check"], "--network-check needs a value"),
        (["--network-check", "--dry-run"], "to pass '--dry-run', write --network-check=--dry-run"),
        (["--image"], "--image needs a value"),
        (["--engine-arg", "--net=host"], "write --engine-arg=--net=host"),
    ],
)
def test_usage_mistakes_exit_2_and_start_nothing(env: Env, argv, needle) -> None:
    env.monkeypatch.setattr(run, "run_from_args", lambda *a: pytest.fail("a run started"))
    try:
        code = cli_module.main([*argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = env.capsys.readouterr()
    assert code == 2 and out == "" and needle in err, err


def test_precheck_returns_2_without_argparse(env: Env) -> None:
    code, out, err = env("--network-sh")
    assert code == 2 and out == "" and "did you mean --network-show?" in err


def test_a_command_after_options_is_the_command(env: Env) -> None:
    code, out, _ = env("--engine", "docker", "--dry-run", "echo", "--network-bogus")
    assert code == 0 and out.rstrip().endswith("echo --network-bogus")
    code, out, _ = env("--engine", "docker", "--dry-run", "--", "network-show")
    assert code == 0 and out.rstrip().endswith(" network-show")


# --------------------------------------------------------------------------- the project


def test_a_subdirectory_of_a_git_repository_uses_the_repository_root(env: Env) -> None:
    (env.project / ".git").mkdir()
    sub = env.project / "src" / "deep"
    sub.mkdir(parents=True)
    env.monkeypatch.chdir(sub)
    assert env("--network-init")[0] == 0
    assert env.repo.is_file() and not (sub / ".copilot_here").exists()
    code, out, _ = env.dry()
    assert code == 0 and f"src={env.project},dst=/work" in out


def test_a_git_worktree_file_counts_and_the_search_stops_below_home(env: Env) -> None:
    (env.project / ".git").write_text("gitdir: /elsewhere\n")
    sub = env.project / "a"
    sub.mkdir()
    env.monkeypatch.chdir(sub)
    assert f"src={env.project},dst=/work" in env.dry()[1]
    # A dotfiles repository in ~ does not make the home the project.
    inner = env.home / "code" / "tool"
    inner.mkdir(parents=True)
    (env.home / ".git").mkdir()
    env.monkeypatch.chdir(inner)
    assert f"src={inner},dst=/work" in env.dry()[1]


@pytest.mark.parametrize("where", ["home", "root", "above-home"])
def test_home_and_root_are_never_the_project(env: Env, where: str) -> None:
    cwd = {"home": env.home, "root": Path("/"), "above-home": env.tmp}[where]
    env.monkeypatch.chdir(cwd)
    for argv in (
        ["--engine", "docker", "--dry-run", "--", "true"],
        ["--network-show"],
        ["--network-init"],
    ):
        code, out, err = env(*argv)
        assert code == 2 and out == "", (argv, err)
        assert "refusing to use" in one_line(err) and "Fix:" in err
    assert not (cwd / ".copilot_here").exists() or cwd == Path("/")
    # The global commands need no project.
    assert env("--network-init-global")[0] == 0


# --------------------------------------------------------------------------- Windows


def test_without_os_getuid_a_clear_message_not_a_crash(env: Env) -> None:
    env.monkeypatch.delattr(os, "getuid")
    for argv in (
        ["--engine", "docker", "--dry-run", "--", "true"],
        ["--network-show"],
        ["--network-init"],
        ["--network-check", "https://a.test/"],
    ):
        code, out, err = env(*argv)
        assert code == 1 and out == "", argv
        assert "WSL" in one_line(err)
    assert not env.repo.exists()


def test_every_uid_use_is_guarded(env: Env) -> None:
    from runtime.host import hostlogs, plan

    env.monkeypatch.delattr(os, "getuid")
    calls = [
        lambda: plan.plan(env.project, env.home, False, None, [], [], environ={}, tty=False),
        lambda: hoststate.ensure_private_dir(env.tmp / "s" / "x", env.tmp / "s"),
        lambda: hostlogs.ensure_chosen_dir(env.tmp / "logs"),
    ]
    for call in calls:
        with pytest.raises(hoststate.StateError, match="WSL"):
            call()


# --------------------------------------------------------------------------- file problems


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def approve(env: Env, path: Path) -> None:
    trust.approve(env.state_root, path, path.read_bytes())


@pytest.mark.parametrize("argv", [["--network-show"], ["--network-enable"], ["--network-trust"]])
def test_a_directory_where_the_config_should_be(env: Env, argv) -> None:
    env.repo.mkdir(parents=True)
    code, _, err = env(*argv)
    assert code == 1
    line = one_line(err)
    assert str(env.repo) in line and "is a directory" in line and "Fix:" in line
    code, _, err = env.dry()
    assert code == 1 and "is a directory" in one_line(err)


@pytest.mark.parametrize("argv", [["--network-show"], ["--network-init"], ["--network-enable"]])
def test_a_file_where_copilot_here_should_be(env: Env, argv) -> None:
    write(env.project / ".copilot_here", "x")
    code, _, err = env(*argv)
    assert code == 1, err
    line = one_line(err)
    assert f"{env.project / '.copilot_here'} is a file" in line and "Fix: move" in line
    code, _, err = env.dry()
    assert code == 1 and "is a file" in one_line(err)


def test_a_file_where_the_global_copilot_here_should_be(env: Env) -> None:
    write(env.home / ".copilot_here", "x")
    for argv in (["--network-init-global"], ["--network-enable-global"]):
        code, _, err = env(*argv)
        assert code == 1 and f"{env.home / '.copilot_here'} is a file" in one_line(err)


def test_not_utf8_is_one_line_with_the_fix(env: Env) -> None:
    write(env.repo, b'{"enabled": true, "x": "\xff\xfe"}')
    approve(env, env.repo)
    for argv in (["--network-show"], ["--network-enable"], ["--network-check", "https://a.test"]):
        code, _, err = env(*argv)
        assert code == 1, (argv, err)
        line = one_line(err)
        assert str(env.repo) in line and "not UTF-8" in line and "Fix: save" in line


def test_a_utf8_bom_is_accepted_and_dropped_by_a_cli_write(env: Env) -> None:
    write(env.repo, b'\xef\xbb\xbf{"enabled": true, "mode": "enforce", "inherit_defaults": false}')
    code, out, err = env("--network-trust")
    assert code == 0, err
    code, out, _ = env("--network-show")
    assert code == 0 and "mode: enforce" in out
    assert env("--network-check", "https://a.test/")[0] == 3
    assert env.dry()[0] == 0
    assert env("--network-disable")[0] == 0
    assert not env.repo.read_bytes().startswith(b"\xef\xbb\xbf")
    assert json.loads(env.repo.read_text())["enabled"] is False


def test_a_logs_path_that_is_a_file(env: Env, tmp_path: Path) -> None:
    logs = write(tmp_path / "logsfile", "x")
    env.monkeypatch.setattr(run, "wait_for", lambda *a: pytest.fail("the engine was started"))
    env.monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    fake = write(tmp_path / "docker", "#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    code, _, err = env("--engine", "docker", "--logs-dir", str(logs), "--", "true")
    assert code == 1 and str(logs) in one_line(err) and "not a directory" in err
    # the default logs path taken by a file
    default = hoststate.state_root(env.home) / "logs"
    write(default, "x")
    code, _, err = env("--engine", "docker", "--", "true")
    assert code == 1 and str(default) in one_line(err)


@pytest.mark.parametrize(
    "url", ["http://[::1", "https://", "ftp://a.test/", "https://a.test:99999/", "http://a b/"]
)
def test_a_malformed_check_url_is_a_usage_error(env: Env, url: str) -> None:
    code, out, err = env("--network-check", url)
    assert code == 2 and out == "" and url in one_line(err)


# Read-only and unreadable files need a place root cannot write or read: a read-only
# bind mount in a mount namespace of its own, and an unprivileged user (setpriv).

UNSHARE = ("unshare", "--mount", "--propagation", "private", "sh", "-c")
READONLY = """
set -e
mount --bind -o ro "$1" "$1"
shift
exec "$@"
"""


def run_in_readonly(
    directory: Path, env: Env, *args: str, state_in_home: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "runtime.host.cli", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if state_in_home:
        full_env.pop("XDG_STATE_HOME")  # the default: ~/.local/state/copilot_here
    return subprocess.run(
        [*UNSHARE, READONLY, "sh", str(directory), *argv],
        cwd=env.project,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_read_only_project(env: Env) -> None:
    for argv in (["--network-init"], ["--network-enable"]):
        r = run_in_readonly(env.project, env, *argv)
        assert r.returncode == 1, r.stderr
        line = one_line(r.stderr)
        assert "read-only file system" in line and str(env.project) in line and "Fix:" in line
    r = run_in_readonly(env.project, env, "--engine", "docker", "--", "true")
    assert r.returncode == 1 and "read-only file system" in one_line(r.stderr)


def test_a_read_only_home(env: Env) -> None:
    for argv in (["--network-init-global"], ["--network-enable-global"]):
        r = run_in_readonly(env.home, env, *argv)
        assert r.returncode == 1, (argv, r.stderr)
        line = one_line(r.stderr)
        assert "read-only file system" in line and str(env.home) in line, line
    # The approvals live in ~/.local/state by default: nothing is written unapproved.
    r = run_in_readonly(env.home, env, "--network-init", state_in_home=True)
    assert r.returncode == 1 and str(env.home) in one_line(r.stderr), r.stderr
    assert "read-only file system" in r.stderr and not env.repo.exists()


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def test_an_unreadable_config(tmp_path: Path) -> None:
    """As an unprivileged user (root reads everything): the config is not readable.
    Everything the user needs lies in a world-traversable directory of its own."""
    from tests.harness.source import python_bin, stage_source

    base = Path(tempfile.mkdtemp(prefix="sp-unreadable-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = stage_source(base / "src")
        project, home, state = base / "project", base / "home", base / "state"
        for d in (project, home, state):
            d.mkdir(mode=0o777)
            d.chmod(0o777)
        config = write(project / ".copilot_here" / "network.json", '{"enabled": true}')
        config.parent.chmod(0o755)
        config.chmod(0o600)
        for argv in (["--network-show"], ["--network-enable"], ["--network-trust"]):
            r = subprocess.run(
                [*NOBODY, python_bin(), "-m", "runtime.host.cli", *argv],
                cwd=project,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src, "HOME": str(home)}
                | {"XDG_STATE_HOME": str(state)},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 1, (argv, r.stdout, r.stderr)
            line = one_line(r.stderr)
            assert str(config) in line and "permission denied" in line and "Fix:" in line
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- symlinked global


def dotfiles(env: Env, data: dict, name: str = "network.json") -> Path:
    target = write(env.tmp / "dotfiles" / "copilot_here" / name, json.dumps(data, indent=2))
    env.glob.parent.mkdir(parents=True, exist_ok=True)
    env.glob.symlink_to(target)
    return target


def test_a_symlinked_global_config_is_read_approved_mounted_and_edited_in_place(env: Env) -> None:
    target = dotfiles(env, {"enabled": True, "mode": "enforce", "inherit_defaults": False})
    code, out, err = env("--network-show")
    assert code == 0, err
    assert f"Config source: {env.glob}" in out and "mode: enforce" in out
    code, out, err = env.dry()
    assert code == 0, err
    assert f"src={target.parent},dst=/home/appuser/.copilot_here,readonly" in out
    assert env("--network-check", "https://a.test/")[0] == 3
    # A CLI write goes through the link: the link stays, the file it points to changes.
    assert env("--network-disable-global")[0] == 0
    assert env.glob.is_symlink() and os.readlink(env.glob) == str(target)
    assert json.loads(target.read_text())["enabled"] is False
    assert env("--network-init-global", "--force")[0] == 0
    assert env.glob.is_symlink() and json.loads(target.read_text())["mode"] == "monitor"
    # Approved by content: a change behind the link is a change.
    target.write_text('{"enabled": false}\n')
    code, _, err = env.dry()
    assert code == 1 and f"the global config {env.glob} changed" in err
    assert env("--network-trust")[0] == 0
    assert env.dry()[0] == 0


def test_a_symlinked_global_config_must_be_alone_and_named_network_json(env: Env) -> None:
    target = dotfiles(env, {"enabled": True})
    write(target.parent / ".bashrc", "secret")
    code, _, err = env.dry()
    assert code == 1 and ".bashrc" in one_line(err) and "directory of its own" in err
    env.glob.unlink()
    (target.parent / ".bashrc").unlink()
    other = write(target.parent / "copilot.json", "{}")
    target.unlink()
    env.glob.symlink_to(other)
    code, _, err = env.dry()
    assert code == 1 and "name the file network.json" in one_line(err)


def test_a_dangling_global_link(env: Env) -> None:
    env.glob.parent.mkdir(parents=True)
    env.glob.symlink_to(env.tmp / "gone.json")
    code, _, err = env("--network-show")
    assert code == 1 and "does not exist" in one_line(err)


def test_a_symlinked_repo_config_or_directory_is_still_refused(env: Env, tmp_path: Path) -> None:
    elsewhere = write(tmp_path / "elsewhere" / "network.json", '{"enabled": false}')
    env.repo.parent.mkdir()
    env.repo.symlink_to(elsewhere)
    code, _, err = env.dry()
    assert code == 1 and "symlink" in one_line(err) and str(env.repo) in err
    env.repo.unlink()
    env.repo.parent.rmdir()
    (env.project / ".copilot_here").symlink_to(elsewhere.parent)
    code, _, err = env.dry()
    assert code == 1 and "symlink" in one_line(err)
    assert env("--network-init", "--force")[0] == 1
    assert elsewhere.read_text() == '{"enabled": false}'


# --------------------------------------------------------------------------- enable says the mode


def test_enable_says_which_mode_is_in_force_and_how_to_enforce(env: Env) -> None:
    code, out, _ = env("--network-enable")
    assert code == 0
    assert "Mode now in force: monitor" in out and '"mode": "enforce"' in out
    assert str(env.repo) in out
    data = json.loads(env.repo.read_text())
    data["mode"] = "enforce"
    env.repo.write_text(json.dumps(data))
    approve(env, env.repo)
    code, out, _ = env("--network-enable")
    assert "Mode now in force: enforce" in out and "blocked" in out
    code, out, _ = env("--network-disable")
    assert "disabled" in out and "allow-all" in out
