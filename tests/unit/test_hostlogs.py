"""The host logs directory: out of the project, never through a symlink (runtime.host.hostlogs)."""

from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import pytest

from runtime.host import hostlogs, hoststate, plan, run
from runtime.host.cli import main as cli_main
from runtime.host.hoststate import StateError, path_key
from runtime.host.netcmds import cmd_show


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    project = tmp_path / "proj"
    home = tmp_path / "home"
    project.mkdir()
    home.mkdir()
    return project, home, {"XDG_STATE_HOME": str(tmp_path / "state")}


def owner_mode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode)


def victim_dir(base: Path) -> Path:
    victim = base / "victim"
    victim.mkdir()
    (victim / "keep").write_text("precious")
    os.chmod(victim, 0o700)
    os.chown(victim, 7000, 7000)
    return victim


def test_default_is_in_the_state_dir_keyed_by_project(dirs) -> None:
    project, home, env = dirs
    expected = Path(env["XDG_STATE_HOME"]) / "copilot_here" / "logs" / path_key(project)
    assert hostlogs.default_logs_dir(project, home, env) == expected
    assert hostlogs.default_logs_dir(project, home, {}) == (
        home / ".local/state/copilot_here/logs" / path_key(project)
    )
    made = hostlogs.prepare(expected, False, home, environ=env)
    assert made == expected and owner_mode(made) == (os.getuid(), 0o700)
    assert list(project.iterdir()) == []


def test_plan_mounts_it_and_tells_the_init(dirs) -> None:
    project, home, env = dirs
    p = plan.plan(project, home, False, None, [], [], environ=env, tty=False)
    logs = hostlogs.default_logs_dir(project, home, env)
    assert plan.Mount(str(logs), "/logs") in p.mounts
    assert p.env["SECURE_PROXY_HOST_LOG_DIR"] == str(logs)
    assert not logs.exists()  # plan() creates nothing (--dry-run)


@pytest.mark.parametrize("where", ["leaf", "logs", "root"])
def test_symlink_at_the_default_location_is_refused(dirs, tmp_path, where) -> None:
    project, home, env = dirs
    logs = hostlogs.default_logs_dir(project, home, env)
    link = {"leaf": logs, "logs": logs.parent, "root": logs.parent.parent}[where]
    link.parent.mkdir(parents=True, exist_ok=True)
    victim = victim_dir(tmp_path)
    link.symlink_to(victim)
    with pytest.raises(
        StateError, match=re.escape(f"logs directory: {link} is a symlink; remove it")
    ):
        hostlogs.prepare(logs, False, home, environ=env)
    assert owner_mode(victim) == (7000, 0o700)
    assert [p.name for p in victim.iterdir()] == ["keep"]


def test_default_left_by_a_killed_run_is_refused_with_the_way_back(dirs) -> None:
    project, home, env = dirs
    logs = hostlogs.prepare(hostlogs.default_logs_dir(project, home, env), False, home, environ=env)
    os.chown(logs, 4321, 4321)  # the log guard's uid, never handed back
    with pytest.raises(StateError, match=re.escape(f"sudo chown -R {os.getuid()}:{os.getgid()}")):
        hostlogs.prepare(logs, False, home, environ=env)
    # An intermediate directory of somebody else's is not explained away like that,
    # nor is a leaf of somebody else's reached through a symlink.
    os.chown(logs.parent, 4321, 4321)
    with pytest.raises(StateError, match="remove it or choose another directory"):
        hostlogs.prepare(logs, False, home, environ=env)
    os.chown(logs.parent, os.getuid(), os.getgid())
    moved = logs.parent.parent / "elsewhere"
    logs.parent.rename(moved)
    logs.parent.symlink_to(moved)
    with pytest.raises(StateError) as info:
        hostlogs.prepare(logs, False, home, environ=env)
    assert "is a symlink" in str(info.value) and "chown" not in str(info.value)


def test_chosen_dir_is_created_component_by_component(tmp_path) -> None:
    chosen = tmp_path / "a" / "b" / "logs"
    assert hostlogs.prepare(chosen, True, tmp_path) == chosen
    for path in (tmp_path / "a", tmp_path / "a" / "b", chosen):
        assert owner_mode(path) == (os.getuid(), 0o700)


@pytest.mark.parametrize("where", ["leaf", "parent"])
def test_chosen_dir_through_a_symlink_is_refused(tmp_path, where) -> None:
    victim = victim_dir(tmp_path)
    os.chown(victim, os.getuid(), os.getgid())  # even a dir of the user's own
    link = tmp_path / "link"
    link.symlink_to(victim)
    chosen = link if where == "leaf" else link / "sub"
    with pytest.raises(StateError, match=re.escape(f"--logs-dir {chosen}: {link} is a symlink")):
        hostlogs.prepare(chosen, True, tmp_path)
    assert [p.name for p in victim.iterdir()] == ["keep"]


def test_chosen_dir_of_another_user_is_refused(tmp_path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4321, 4321)
    with pytest.raises(StateError, match="belongs to uid 4321, not to you "):
        hostlogs.prepare(theirs, True, tmp_path)
    with pytest.raises(StateError, match="belongs to uid 4321, not to you or root"):
        hostlogs.prepare(theirs / "mine", True, tmp_path)
    assert not (theirs / "mine").exists()


def test_chosen_file_is_refused(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match="is not a directory"):
        hostlogs.prepare(tmp_path / "f", True, tmp_path)


@pytest.mark.parametrize("chosen", ["proj/logs", "proj", "."])
def test_chosen_dir_overlapping_the_project_is_refused(dirs, tmp_path, chosen) -> None:
    project, home, env = dirs
    path = (tmp_path / chosen).resolve()
    p = plan.plan(project, home, False, path, [], [], environ=env, tty=False)
    others = [(m.source, m.target) for m in p.mounts if m.target != "/logs"]
    with pytest.raises(
        StateError, match=re.escape(f"overlaps {project}, which the container sees at /work")
    ):
        hostlogs.prepare(path, True, home, others)


def test_logs_source_never_resolves_a_symlink(tmp_path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    got = hostlogs.logs_source(tmp_path, tmp_path, tmp_path / "link")
    assert got == tmp_path / "link"


def test_cli_refuses_with_one_line_and_exit_1(tmp_path, monkeypatch, capsys) -> None:
    victim = victim_dir(tmp_path)
    (tmp_path / "link").symlink_to(victim)
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_engine(*_args: object) -> None:
        raise AssertionError("the engine was started")

    monkeypatch.setattr(run, "wait_for", no_engine)
    monkeypatch.setattr(run.shutil, "which", lambda _name: "/usr/bin/docker")
    code = cli_main(["--engine", "docker", "--logs-dir", str(tmp_path / "link"), "--", "true"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and f"{tmp_path / 'link'} is a symlink" in err, err
    assert owner_mode(victim) == (7000, 0o700)


def test_network_show_names_the_host_log(dirs, monkeypatch, tmp_path) -> None:
    project, home, env = dirs
    monkeypatch.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])
    state = hoststate.state_root(home, env)
    out = io.StringIO()
    cmd_show(project, home, False, state, out)
    logs = hostlogs.default_logs_dir(project, home, env)
    assert f"Traffic log on the host: {logs}/traffic.jsonl" in out.getvalue()
    out = io.StringIO()
    cmd_show(project, home, False, state, out, tmp_path / "mine")
    assert f"Traffic log on the host: {tmp_path / 'mine'}/traffic.jsonl" in out.getvalue()
    assert not logs.exists()
