"""The docker/podman argv and the sandbox spec built by `copilot_here` (runtime.run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime import run
from runtime.cli import build_parser
from runtime.hoststate import path_key


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
    return project, home, run.plan(project, home, **defaults)


def config(base: Path) -> Path:
    path = base / ".copilot_here" / "network.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"enabled": true}')
    return path


def test_docker_without_config(tmp_path):
    project, home, p = make_plan(tmp_path, command=["--", "echo", "hi"])
    argv = run.engine_argv("docker", "img:1", p)
    logs = home / ".local/state/copilot_here/logs" / path_key(project)  # out of the project
    assert argv == [
        *("docker", "run", "--rm", "-i", "--cap-add=NET_ADMIN"),
        *("-e", "PUID=501", "-e", "PGID=20", "-e", f"SECURE_PROXY_HOST_LOG_DIR={logs}"),
        *("-v", f"{project}:/work"),
        *("-v", f"{logs}:/logs"),
        *("img:1", "echo", "hi"),
    ]


def test_tty_gives_it_and_term(tmp_path):
    _, _, p = make_plan(tmp_path, tty=True, environ={"TERM": "xterm-256color"})
    argv = run.engine_argv("docker", "img", p)
    assert "-it" in argv and "-i" not in argv
    assert "TERM=xterm-256color" in argv


def test_repo_config_directory_read_only_unless_write(tmp_path):
    project = tmp_path / "proj"
    cfg = config(project)
    _, _, p = make_plan(tmp_path)
    argv = run.engine_argv("docker", "img", p)
    assert f"{cfg.parent}:/work/.copilot_here:ro" in argv
    _, _, p = make_plan(tmp_path, config_write=True)
    argv = run.engine_argv("docker", "img", p)
    assert f"{cfg.parent}:/work/.copilot_here" in argv
    # the directory, never the file
    assert not any(a.startswith(str(cfg)) for a in argv)


def test_global_config_when_no_repo_config(tmp_path):
    cfg = config(tmp_path / "home")
    _, _, p = make_plan(tmp_path)
    argv = run.engine_argv("docker", "img", p)
    assert f"{cfg.parent}:/home/appuser/.copilot_here:ro" in argv
    assert not any(":/work/.copilot_here" in a for a in argv)


def test_repo_config_wins_and_global_is_not_mounted(tmp_path):
    config(tmp_path / "home")
    config(tmp_path / "proj")
    _, _, p = make_plan(tmp_path)
    targets = [m.target for m in p.mounts]
    assert "/work/.copilot_here" in targets
    assert "/home/appuser/.copilot_here" not in targets


def test_podman_adds_net_raw(tmp_path):
    _, _, p = make_plan(tmp_path)
    argv = run.engine_argv("podman", "img", p)
    assert argv[:2] == ["podman", "run"]
    assert "--cap-add=NET_ADMIN" in argv and "--cap-add=NET_RAW" in argv


def test_cap_drop_replaces_the_add(tmp_path):
    _, _, p = make_plan(tmp_path)
    p.cap_drop = ["net_admin"]
    argv = run.engine_argv("docker", "img", p)
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
    argv = run.engine_argv("docker", "img", p, ["--network=ns:/run/netns/x"])
    assert f"{logs}:/logs" in argv
    assert f"{ca}:/ca/upstream-ca.pem:ro" in argv
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
    with pytest.raises(run.RunError, match="no such file"):
        make_plan(tmp_path, environ={"SECURE_PROXY_UPSTREAM_CA": str(tmp_path / "nope.pem")})


def test_bad_add_host(tmp_path):
    with pytest.raises(run.RunError, match="NAME:IP"):
        make_plan(tmp_path, add_hosts=["justaname"])


def test_sandbox_spec_round_trips(tmp_path):
    _, _, p = make_plan(tmp_path, command=["--", "id"], add_hosts=["a.test:1.2.3.4"])
    spec = run.sandbox_spec(p, "spnet-abc123")
    from runtime.sandbox import Spec

    back = Spec.from_json(spec.to_json())
    assert back.command == ["id"]
    assert back.netns == "spnet-abc123"
    assert back.add_hosts == [("a.test", "1.2.3.4")]
    assert [m.target for m in back.mounts] == ["/work", "/logs"]
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
    from runtime.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
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
    assert run.choose_engine(docker_ok=True, podman_ok=True) == "docker"
    assert run.choose_engine(docker_ok=False, podman_ok=True) == "podman"
    assert run.choose_engine(docker_ok=False, podman_ok=False) == "sandbox"


def test_podman_without_the_image_is_not_chosen():
    assert run.podman_has("localhost/no-such-image-" + os.urandom(4).hex()) is False
