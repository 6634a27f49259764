"""The docker/podman argv and the sandbox spec built by `copilot_here` (runtime.host.plan,
engines, run, writable)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from runtime.host import engines, run, writable
from runtime.host import plan as planning
from runtime.host.cli import build_parser
from runtime.host.fileproblems import FileProblem
from runtime.host.hoststate import path_key


def make_plan(tmp_path: Path, **kw):
    project = tmp_path / "proj"
    home = tmp_path / "home"
    project.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    defaults = dict(
        config_write=False,
        logs_dir=None,
        add_hosts=[],
        command=[],
        environ={},
        tty=False,
        uid=501,
        gid=20,
    )
    defaults.update(kw)
    return project, home, planning.plan(project, home, **defaults)


def config(base: Path) -> Path:
    path = base / ".copilot_here" / "network.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"enabled": true}')
    return path


def empty(home: Path) -> Path:
    return home / ".local/state/copilot_here/empty"


def bind(src: object, dst: str, ro: bool = False) -> str:
    return f"--mount=type=bind,src={src},dst={dst}" + (",readonly" if ro else "")


def test_docker_without_config(tmp_path):
    project, home, p = make_plan(tmp_path, command=["--", "echo", "hi"])
    argv = engines.engine_argv("docker", "img:1", p)
    logs = home / ".local/state/copilot_here/logs" / path_key(project)  # out of the project
    assert argv == [
        *("docker", "run", "--rm", "-i", f"--name=copilot_here-{path_key(project)}"),
        f"--label=copilot_here.started-by=copilot_here {engines.version()} (secure proxy host CLI)",
        f"--label=copilot_here.project={project}",
        "--pull=missing",
        "--cap-add=NET_ADMIN",
        *("-e", "PUID=501", "-e", "PGID=20", "-e", f"SECURE_PROXY_HOST_LOG_DIR={logs}"),
        bind(project, "/work"),
        # Nothing may be planted in /work/.copilot_here during the run.
        bind(empty(home), "/work/.copilot_here", ro=True),
        bind(logs, "/logs"),
        *("img:1", "echo", "hi"),
    ]


@pytest.mark.parametrize(
    "name", ["proj:with:colons", "proj,with,commas", 'proj "quoted", odd', " leading space"]
)
def test_mount_paths_with_colon_comma_and_quote_stay_one_path(tmp_path, name):
    """Docker and Podman read --mount as one CSV record (Go's encoding/csv, which
    Python's csv module reads the same way): each path must come back whole."""
    project = tmp_path / name
    project.mkdir()
    p = planning.plan(project, tmp_path, False, None, [], [], environ={}, tty=False, uid=1, gid=1)
    argv = engines.engine_argv("podman", "img", p)
    work = next(a for a in argv if a.startswith("--mount=") and "/work" in a and "logs" not in a)
    fields = next(csv.reader([work.removeprefix("--mount=")], strict=True))
    assert fields == ["type=bind", f"src={project}", "dst=/work"], work
    assert not any(a.startswith("-v") for a in argv)


def test_keep_id_only_for_rootless_podman(tmp_path):
    _, _, p = make_plan(tmp_path)
    rootless = engines.engine_argv("podman", "img", p, rootless=True)
    assert "--userns=keep-id" in rootless and "--user=0:0" in rootless
    for argv in (
        engines.engine_argv("podman", "img", p, rootless=False),
        engines.engine_argv("docker", "img", p, rootless=True),
    ):
        assert not [a for a in argv if a.startswith(("--userns", "--user="))]


@pytest.mark.parametrize(("answer", "rootless"), [("true", True), ("false", False), ("", False)])
def test_rootless_is_what_podman_info_says(tmp_path, monkeypatch, answer, rootless):
    fake = tmp_path / "podman"
    fake.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "info --format {{.Host.Security.Rootless}}" ] || exit 9\n'
        f"echo {answer}\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert engines.podman_rootless() is rootless
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert engines.podman_rootless() is False  # no podman: no keep-id


def test_name_labels_and_pull(tmp_path):
    project, _, p = make_plan(tmp_path)
    argv = engines.engine_argv("docker", "img", p, pull="never", name="copilot_here-x-2")
    assert "--name=copilot_here-x-2" in argv and "--pull=never" in argv
    assert f"--label=copilot_here.project={project}" in argv
    assert any(a.startswith("--label=copilot_here.started-by=copilot_here ") for a in argv)
    own = engines.engine_argv("docker", "img", p, ["--name", "mine"])
    assert not [a for a in own if a.startswith("--name=")] and own.count("--name") == 1
    # unique per project path, readable, and a valid container name
    other = engines.container_name(str(tmp_path / "elsewhere" / "proj"))
    assert engines.container_name(str(project)) != other
    assert re.fullmatch(r"copilot_here-proj-[0-9a-f]{12}", engines.container_name(str(project)))
    odd = engines.container_name("/x/My Project: v2,ü")
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", odd), odd


FAKE_DOCKER = """#!/bin/sh
# `docker container inspect --format {{.Id}} NAME`: the project's first name is taken.
case "$5" in *-2) exit 1 ;; *-*-*) exit 0 ;; esac
exit 1
"""


def test_a_second_run_of_the_same_project_gets_a_numbered_name(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    base = engines.container_name("/src/proj")
    assert engines.free_name("docker", "/src/proj") == f"{base}-2"


def test_net_admin_only_when_the_guard_starts(tmp_path):
    _, _, p = make_plan(tmp_path, active=False)
    for engine in ("docker", "podman"):
        argv = engines.engine_argv(engine, "img", p)
        assert not [a for a in argv if a.startswith("--cap-add")], argv
    _, _, p = make_plan(tmp_path, active=True)
    assert "--cap-add=NET_ADMIN" in engines.engine_argv("docker", "img", p)


@pytest.mark.parametrize(
    ("repo", "glob", "write", "active"),
    [
        (None, None, False, False),
        (None, None, True, False),  # nothing to mount writable
        ({"enabled": False}, None, False, False),
        ({"enabled": False}, None, True, True),
        ({"enabled": False, "log_to_file": True}, None, False, True),
        ({"enabled": True, "mode": "enforce"}, None, False, True),
        (None, {"enabled": True}, False, True),
        (None, {"enabled": False}, True, True),
    ],
)
def test_guard_active(tmp_path, repo, glob, write, active):
    project, home = tmp_path / "p", tmp_path / "h"
    for base, data in ((project, repo), (home, glob)):
        base.mkdir()
        if data is not None:
            (base / ".copilot_here").mkdir()
            (base / ".copilot_here/network.json").write_text(json.dumps(data))
    assert run.guard_active(project, home, write) is active


@pytest.mark.parametrize(
    "extra",
    [
        ["--network=host"],
        ["--net=host"],
        ["--net", "host"],
        ["--network", "HOST"],
        ["--pid=host"],
        ["--pid", "host"],
        ["--userns=host"],
        ["--userns", "host"],
        ["--privileged"],
        ["--privileged=true"],
        ["--cap-add=ALL"],
        ["--cap-add=all"],
        ["--cap-add", "ALL"],
        ["--cap-add=NET_RAW,ALL"],
        ["--cap-add=CAP_ALL"],
        ["--entrypoint=/bin/sh"],
    ],
)
def test_engine_args_that_defeat_the_guard_are_refused(extra):
    with pytest.raises(planning.RunError, match="refused"):
        engines.refuse_engine_args(extra)


@pytest.mark.parametrize(
    "extra",
    [
        ["--network=ns:/run/netns/x"],
        ["--network", "bridge"],
        ["--privileged=false"],
        ["--cap-add=SYS_PTRACE"],
        ["-e", "HOST=host"],
        ["--name=host"],
    ],
)
def test_other_engine_args_pass(extra):
    engines.refuse_engine_args(extra)


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine-arg=--network=host"],
        ["--engine-arg=--net", "--engine-arg=host"],
        ["--engine-arg=--privileged"],
        ["--engine-arg=--cap-add=all"],
    ],
)
def test_cli_refuses_them_with_exit_2_and_starts_nothing(tmp_path, monkeypatch, capsys, argv):
    from runtime.host.cli import main

    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert main(["--engine", "docker", *argv, "--", "true"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("copilot_here: --engine-arg=") and "refused" in err
    assert len(err.strip().splitlines()) == 1


def test_pull_options(tmp_path, monkeypatch, capsys):
    from runtime.host.cli import main

    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for flags, policy in (([], "missing"), (["--pull"], "always"), (["--no-pull"], "never")):
        assert main(["--engine", "docker", "--dry-run", *flags, "--", "true"]) == 0
        assert f" --pull={policy} " in capsys.readouterr().out
    assert main(["--engine", "sandbox", "--dry-run", "--pull", "--", "true"]) == 2
    assert "--pull/--no-pull go with" in capsys.readouterr().err


def test_tty_gives_it_and_term(tmp_path):
    _, _, p = make_plan(tmp_path, tty=True, environ={"TERM": "xterm-256color"})
    argv = engines.engine_argv("docker", "img", p)
    assert "-it" in argv and "-i" not in argv
    assert "TERM=xterm-256color" in argv


def test_repo_config_directory_read_only_unless_write(tmp_path):
    project = tmp_path / "proj"
    cfg = config(project)
    _, _, p = make_plan(tmp_path)
    argv = engines.engine_argv("docker", "img", p)
    assert bind(cfg.parent, "/work/.copilot_here", ro=True) in argv
    _, _, p = make_plan(tmp_path, config_write=True)
    argv = engines.engine_argv("docker", "img", p)
    assert bind(cfg.parent, "/work/.copilot_here") in argv
    # the directory, never the file
    assert not any(f"src={cfg}," in a for a in argv)


def test_global_config_when_no_repo_config(tmp_path):
    cfg = config(tmp_path / "home")
    _, home, p = make_plan(tmp_path)
    argv = engines.engine_argv("docker", "img", p)
    assert bind(cfg.parent, "/home/appuser/.copilot_here", ro=True) in argv
    assert [a for a in argv if "dst=/work/.copilot_here" in a] == [
        bind(empty(home), "/work/.copilot_here", ro=True)
    ]


def test_config_write_with_global_config_keeps_work_config_dir_read_only(tmp_path):
    cfg = config(tmp_path / "home")
    _, home, p = make_plan(tmp_path, config_write=True)
    by_target = {m.target: m for m in p.mounts}
    assert by_target["/home/appuser/.copilot_here"].source == str(cfg.parent)
    assert not by_target["/home/appuser/.copilot_here"].read_only
    assert by_target["/work/.copilot_here"].source == str(empty(home))
    assert by_target["/work/.copilot_here"].read_only


def test_empty_dir_follows_xdg_state_home_or_is_given(tmp_path):
    _, _, p = make_plan(tmp_path, environ={"XDG_STATE_HOME": str(tmp_path / "st")})
    assert {m.target: m.source for m in p.mounts}["/work/.copilot_here"] == str(
        tmp_path / "st/copilot_here/empty"
    )
    _, _, p = make_plan(tmp_path, empty_dir=tmp_path / "e")
    assert {m.target: m.source for m in p.mounts}["/work/.copilot_here"] == str(tmp_path / "e")


def test_config_mountpoint_is_made_by_the_user_and_never_a_symlink(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    planning.prepare_config_mountpoint(project)
    assert (project / ".copilot_here").is_dir()
    planning.prepare_config_mountpoint(project)  # again: fine
    (project / ".copilot_here").rmdir()
    (project / ".copilot_here").symlink_to(tmp_path)
    with pytest.raises(FileProblem, match="symlink"):
        planning.prepare_config_mountpoint(project)
    (project / ".copilot_here").unlink()
    (project / ".copilot_here").write_text("x")
    with pytest.raises(FileProblem, match="is a file, but the config directory belongs there"):
        planning.prepare_config_mountpoint(project)


def test_repo_config_wins_and_global_is_not_mounted(tmp_path):
    config(tmp_path / "home")
    config(tmp_path / "proj")
    _, _, p = make_plan(tmp_path)
    targets = [m.target for m in p.mounts]
    assert "/work/.copilot_here" in targets
    assert "/home/appuser/.copilot_here" not in targets


def test_podman_adds_net_raw(tmp_path):
    _, _, p = make_plan(tmp_path)
    argv = engines.engine_argv("podman", "img", p)
    assert argv[:2] == ["podman", "run"]
    assert "--cap-add=NET_ADMIN" in argv and "--cap-add=NET_RAW" in argv


def test_cap_drop_replaces_the_add(tmp_path):
    _, _, p = make_plan(tmp_path)
    p.cap_drop = ["net_admin"]
    argv = engines.engine_argv("docker", "img", p)
    assert "--cap-add=NET_ADMIN" not in argv
    assert "--cap-drop=NET_ADMIN" in argv


def test_logs_dir_add_host_and_upstream_ca(tmp_path):
    ca = tmp_path / "corp.pem"
    ca.write_text("pem")
    logs = tmp_path / "logs"
    _, _, p = make_plan(
        tmp_path,
        logs_dir=logs,
        add_hosts=["api.github.com:198.18.0.1", "v6.test:2001:db8::1"],
        environ={"SECURE_PROXY_UPSTREAM_CA": str(ca)},
    )
    argv = engines.engine_argv("docker", "img", p, ["--network=ns:/run/netns/x"])
    assert bind(logs, "/logs") in argv
    assert bind(ca, "/ca/upstream-ca.pem", ro=True) in argv
    assert "SECURE_PROXY_UPSTREAM_CA=/ca/upstream-ca.pem" in argv
    i = argv.index("--add-host")
    assert argv[i : i + 4] == [
        "--add-host",
        "api.github.com:198.18.0.1",
        "--add-host",
        "v6.test:2001:db8::1",
    ]
    assert argv[-2:] == ["--network=ns:/run/netns/x", "img"]


def test_missing_upstream_ca_is_an_error(tmp_path):
    with pytest.raises(planning.RunError, match="no such file"):
        make_plan(tmp_path, environ={"SECURE_PROXY_UPSTREAM_CA": str(tmp_path / "nope.pem")})


def test_bad_add_host(tmp_path):
    with pytest.raises(planning.RunError, match="NAME:IP"):
        make_plan(tmp_path, add_hosts=["justaname"])


def test_sandbox_spec_round_trips(tmp_path):
    _, _, p = make_plan(tmp_path, command=["--", "id"], add_hosts=["a.test:1.2.3.4"])
    spec = run.sandbox_spec(p, "spnet-abc123")
    from runtime.host.sandbox import Spec

    back = Spec.from_json(spec.to_json())
    assert back.command == ["id"]
    assert back.netns == "spnet-abc123"
    assert back.add_hosts == [("a.test", "1.2.3.4")]
    assert [m.target for m in back.mounts] == ["/work", "/work/.copilot_here", "/logs"]
    env = json.loads(spec.to_json())["env"]
    assert env == {"PUID": "501", "PGID": "20", "SECURE_PROXY_HOST_LOG_DIR": p.mounts[-1].source}


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "docker", "--dry-run", "--", "echo", "hi"],
        ["--dry-run", "--engine", "podman", "--add-host", "a:1.2.3.4", "--", "sh", "-c", "x"],
    ],
)
def test_cli_dry_run_prints_the_argv(tmp_path, monkeypatch, capsys, argv):
    from runtime.host.cli import main

    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert main(argv) == 0
    out = capsys.readouterr().out.strip()
    engine = argv[argv.index("--engine") + 1]
    assert out.startswith(f"{engine} run --rm")
    assert out.endswith(" ".join(argv[argv.index("--") + 1 :]).replace("sh -c x", "sh -c x"))


def test_parser_keeps_command_after_double_dash():
    args = build_parser().parse_args(["--engine", "sandbox", "--", "ls", "--engine", "-l"])
    assert args.engine == "sandbox"
    assert [a for a in args.command if a != "--"] == ["ls", "--engine", "-l"]


def test_engine_choice_docker_then_podman_with_image_then_sandbox():
    assert engines.choose_engine(docker_ok=True, podman_ok=True) == "docker"
    assert engines.choose_engine(docker_ok=False, podman_ok=True) == "podman"
    assert engines.choose_engine(docker_ok=False, podman_ok=False) == "sandbox"


def test_podman_without_the_image_is_not_chosen():
    assert engines.podman_has("localhost/no-such-image-" + os.urandom(4).hex()) is False


# --------------------------------------------------------------------------- waiting for the engine


def test_wait_for_returns_the_code_and_the_signal_as_exec_would():
    assert writable.wait_for(["sh", "-c", "exit 3"]) == 3
    assert writable.wait_for(["sh", "-c", "kill -KILL $$"]) == 128 + 9


def test_wait_for_forwards_sigterm_and_survives_sigint():
    import signal
    import threading

    script = "trap 'echo; exit 7' TERM; i=0; while [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done"
    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    assert writable.wait_for(["sh", "-c", script]) == 7
    timer.join()
    # Ctrl-C meant for the engine does not end the CLI before it can report.
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    assert writable.wait_for(["sh", "-c", "sleep 1; exit 4"]) == 4
    timer.join()
    assert signal.getsignal(signal.SIGINT) is before


def test_wait_for_a_missing_engine_is_a_run_error():
    with pytest.raises(planning.RunError, match="cannot start"):
        writable.wait_for(["/nonexistent/engine"])
