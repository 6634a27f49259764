"""The host side of signing in (runtime.host.signin): where the token comes from, gh's
scope check against a stand-in `gh` (a real program on PATH), the token passed by name
only, the start-up line; and the Copilot CLI's state directory (runtime.host.copilotstate)."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from runtime.host import copilotstate, signin
from runtime.host import plan as planning
from runtime.host.hoststate import StateError

TOKEN = "gho_" + "Ab3" * 12
GH_TOKEN_FILE = "gho_" + "Zy7" * 12


def fake_gh(tmp_path: Path, scopes: str | None, token: str = GH_TOKEN_FILE, rc: int = 0) -> str:
    """A stand-in gh: `auth token` prints the token, `auth status` the scopes line as gh
    2.x does (on stderr), and records how it was called."""
    scope_line = "" if scopes is None else f"  - Token scopes: {scopes}"
    script = tmp_path / "gh"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "$@" >> {tmp_path}/gh.calls
            if [ "$1 $2" = "auth token" ]; then
                [ {rc} -eq 0 ] && echo {token}
                exit {rc}
            fi
            if [ "$1 $2" = "auth status" ]; then
                echo "github.com" >&2
                echo "  ✓ Logged in to github.com account someone (keyring)" >&2
                echo "  - Active account: true" >&2
                echo "  - Token: gho_************************************" >&2
                echo "{scope_line}" >&2
                exit 0
            fi
            exit 1
            """
        )
    )
    script.chmod(0o755)
    return str(script)


def env(**kw: str) -> dict[str, str]:
    return {"PATH": "/nonexistent", **kw}


# ----------------------------------------------------------------------------- sources


def test_gh_token_from_the_environment_first_then_github_token():
    found = signin.find(env(GH_TOKEN=TOKEN, GITHUB_TOKEN="other" * 8), False)
    assert (found.source, found.token) == ("GH_TOKEN from the host environment", TOKEN)
    found = signin.find(env(GITHUB_TOKEN=TOKEN), False)
    assert (found.source, found.token) == ("GITHUB_TOKEN from the host environment", TOKEN)
    # Passed under both names copilot_here uses, by name only.
    assert found.names() == ["GH_TOKEN", "GITHUB_TOKEN"]
    assert found.values() == {"GH_TOKEN": TOKEN, "GITHUB_TOKEN": TOKEN}
    assert TOKEN not in repr(found)


def test_no_token_and_no_gh_is_none():
    found = signin.find(env(), False)
    assert found.token is None and found.names() == [] and found.values() == {}
    assert found.line(True) == "[Network] Sign-in: none: copilot will ask you to /login"


def test_gh_with_the_copilot_scope(tmp_path):
    gh = fake_gh(tmp_path, "'copilot', 'gist', 'read:org', 'repo'")
    found = signin.find(env(), False, gh=gh)
    assert (found.source, found.token) == ("from gh auth token", GH_TOKEN_FILE)
    calls = (tmp_path / "gh.calls").read_text().splitlines()
    assert calls == ["auth token", "auth status --active --hostname github.com"]


def test_gh_is_found_on_path(tmp_path):
    fake_gh(tmp_path, "'copilot'")
    found = signin.find({"PATH": str(tmp_path)}, False)
    assert found.token == GH_TOKEN_FILE


def test_gh_without_the_copilot_scope_is_refused_with_the_fix(tmp_path):
    gh = fake_gh(tmp_path, "'gist', 'read:org', 'repo'")
    with pytest.raises(signin.SignInError, match="lacks the 'copilot' scope") as err:
        signin.find(env(), False, gh=gh)
    assert "gh auth refresh -h github.com -s copilot" in str(err.value)
    assert GH_TOKEN_FILE not in str(err.value)


def test_a_fine_grained_token_has_no_scopes_to_check(tmp_path):
    gh = fake_gh(tmp_path, None)
    assert signin.find(env(), False, gh=gh).token == GH_TOKEN_FILE


def test_gh_not_signed_in_is_none(tmp_path):
    gh = fake_gh(tmp_path, "'copilot'", rc=1)
    assert signin.find(env(), False, gh=gh).token is None


@pytest.mark.parametrize(
    "scope", ["admin:org", "admin:enterprise", "manage_runners:org", "delete_repo"]
)
def test_admin_scopes_are_refused_without_a_terminal(tmp_path, scope):
    gh = fake_gh(tmp_path, f"'copilot', 'repo', '{scope}'")
    asked = []
    with pytest.raises(signin.SignInError, match="admin scopes") as err:
        signin.find(env(), False, ask=lambda q: asked.append(q) or True, gh=gh)
    assert asked == []  # never asked without a terminal
    assert scope in str(err.value) and "--remove-scopes" in str(err.value)


def test_admin_scopes_are_asked_about_on_a_terminal(tmp_path):
    gh = fake_gh(tmp_path, "'copilot', 'admin:org'")
    asked: list[str] = []
    found = signin.find(env(), True, ask=lambda q: asked.append(q) or True, gh=gh)
    assert found.token == GH_TOKEN_FILE
    assert "admin:org" in asked[0] and asked[0].endswith("[y/N] ")
    with pytest.raises(signin.SignInError, match="admin scopes"):
        signin.find(env(), True, ask=lambda q: False, gh=gh)


def test_the_environment_wins_over_gh_and_gh_is_not_asked(tmp_path):
    gh = fake_gh(tmp_path, "'admin:org'")
    assert signin.find(env(GH_TOKEN=TOKEN), False, gh=gh).token == TOKEN
    assert not (tmp_path / "gh.calls").exists()


def test_the_switch():
    none = signin.find(env(GH_TOKEN=TOKEN, COPILOT_HERE_SIGN_IN="none"), False)
    assert none.token is None
    assert none.line(True) == (
        "[Network] Sign-in: none (COPILOT_HERE_SIGN_IN=none): copilot will ask you to /login"
    )
    through = signin.find(env(GH_TOKEN=TOKEN, COPILOT_HERE_SIGN_IN="pass-through"), False)
    assert through.token == TOKEN and through.container_env() == {
        "SECURE_PROXY_SIGNIN": "pass-through"
    }
    with pytest.raises(signin.SignInError, match="COPILOT_HERE_SIGN_IN='maybe': unknown"):
        signin.find(env(COPILOT_HERE_SIGN_IN="maybe"), False)


def test_the_line():
    found = signin.find(env(GH_TOKEN=TOKEN), False)
    assert found.line(True) == (
        "[Network] Sign-in: GH_TOKEN from the host environment (the agent sees a placeholder)"
    )
    assert found.line(False) == (
        "[Network] Sign-in: GH_TOKEN from the host environment "
        "(rules disabled: the agent gets the token itself)"
    )


# ----------------------------------------------------------------------------- by name only


def run_cli(tmp_path, monkeypatch, capsys, argv, **environ):
    from runtime.host.cli import main

    project = tmp_path / "proj"
    project.mkdir(exist_ok=True)
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "GITHUB_TOKEN", "COPILOT_HERE_SIGN_IN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_dry_run_names_the_token_never_its_value(tmp_path, monkeypatch, capsys, engine):
    argv = ["--engine", engine, "--dry-run", "--", "copilot"]
    code, out, err = run_cli(tmp_path, monkeypatch, capsys, argv, GH_TOKEN=TOKEN)
    assert code == 0, err
    assert TOKEN not in out and TOKEN not in err
    words = out.split()
    assert "GH_TOKEN" in words and "GITHUB_TOKEN" in words
    assert words[words.index("GH_TOKEN") - 1] == "-e"
    assert err.strip().splitlines()[-1] == (
        "[Network] Sign-in: GH_TOKEN from the host environment "
        "(rules disabled: the agent gets the token itself)"
    )
    # The Copilot CLI's state, mounted at the container user's ~/.copilot.
    state = tmp_path / ".config" / "copilot-cli-docker"
    assert f"--mount=type=bind,src={state},dst=/home/appuser/.copilot" in words
    assert not state.exists()  # a dry run creates nothing


def test_sandbox_dry_run_spec_has_the_names_only(tmp_path, monkeypatch, capsys):
    argv = ["--engine", "sandbox", "--dry-run", "--", "copilot"]
    code, out, err = run_cli(tmp_path, monkeypatch, capsys, argv, GITHUB_TOKEN=TOKEN)
    assert code == 0, err
    assert TOKEN not in out and TOKEN not in err
    spec = json.loads(out.removeprefix("sandbox "))
    assert spec["env_by_name"] == ["GH_TOKEN", "GITHUB_TOKEN"]
    assert "GH_TOKEN" not in spec["env"] and "GITHUB_TOKEN" not in spec["env"]


def test_no_token_no_names(tmp_path, monkeypatch, capsys):
    argv = ["--engine", "docker", "--dry-run", "--", "copilot"]
    monkeypatch.delenv("GH_TOKEN", raising=False)
    code, out, err = run_cli(tmp_path, monkeypatch, capsys, argv)
    assert code == 0, err
    assert "GH_TOKEN" not in out.split()
    assert "[Network] Sign-in: none: copilot will ask you to /login" in err


def test_a_refused_gh_token_stops_the_run_with_exit_1(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_gh(bin_dir, "'copilot', 'admin:org'")
    argv = ["--engine", "docker", "--dry-run", "--", "copilot"]
    monkeypatch.delenv("GH_TOKEN", raising=False)
    code, out, err = run_cli(tmp_path, monkeypatch, capsys, argv)
    assert code == 0 and "Sign-in: none" in err  # no gh on PATH
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    from runtime.host.cli import main

    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and "admin scopes (admin:org)" in err and GH_TOKEN_FILE not in err


# ----------------------------------------------------------------------------- ~/.copilot


def a_plan(tmp_path: Path, uid: int, gid: int) -> planning.Plan:
    project = tmp_path / "proj"
    project.mkdir(exist_ok=True)
    return planning.plan(
        project, tmp_path, False, None, [], [], environ={}, tty=False, uid=uid, gid=gid
    )


def test_the_state_directory_follows_xdg_config_home(tmp_path):
    assert copilotstate.host_dir(tmp_path, {}) == tmp_path / ".config/copilot-cli-docker"
    xdg = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert copilotstate.host_dir(tmp_path, xdg) == tmp_path / "cfg/copilot-cli-docker"
    assert copilotstate.host_dir(tmp_path, {"XDG_CONFIG_HOME": "rel"}).is_relative_to(tmp_path)


def test_it_is_created_private_and_owned_by_the_containers_user(tmp_path):
    p = a_plan(tmp_path, os.getuid(), os.getgid())
    path = copilotstate.attach(p, tmp_path, {})
    assert p.mounts[-1] == planning.Mount(str(path), "/home/appuser/.copilot")
    copilotstate.prepare(path, p)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    expected = os.getuid() or copilotstate.ROOT_REPLACEMENT  # root's runs: uid 1000 inside
    assert st.st_uid == expected
    copilotstate.prepare(path, p)  # again: it is there and right


def test_a_symlink_is_refused_never_followed(tmp_path):
    p = a_plan(tmp_path, os.getuid(), os.getgid())
    target = tmp_path / "elsewhere"
    target.mkdir()
    path = copilotstate.host_dir(tmp_path, {})
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    with pytest.raises(StateError, match="is a symlink"):
        copilotstate.prepare(path, p)
    assert os.listdir(target) == []


def test_a_file_or_another_users_directory_is_refused(tmp_path):
    p = a_plan(tmp_path, os.getuid(), os.getgid())
    path = copilotstate.host_dir(tmp_path, {})
    path.parent.mkdir(parents=True)
    path.write_text("x")
    with pytest.raises(StateError):
        copilotstate.prepare(path, p)
    path.unlink()
    path.mkdir()
    if os.getuid() == 0:  # CI runs as root: a directory of another uid
        os.chown(path, 4321, 4321)
        with pytest.raises(StateError, match=r"belongs to uid 4321.*chown -R 1000:1000"):
            copilotstate.prepare(path, p)


def test_the_engine_gets_the_value_in_its_environment_not_its_argv(tmp_path, monkeypatch, capsys):
    from runtime.host import run

    started: list[tuple[list[str], dict[str, str]]] = []

    class Exec(BaseException):
        """What exec is to the CLI: nothing after it runs."""

    def engine(argv: list[str]) -> int:
        started.append((list(argv), dict(os.environ)))
        raise Exec

    monkeypatch.setattr(run, "wait_for", engine)  # the CLI waits for the engine it starts
    monkeypatch.setattr(run.shutil, "which", lambda *_a, **_k: "/usr/bin/docker")
    # Recorded, so the value the CLI puts in its environment for the engine is undone.
    monkeypatch.setenv("GH_TOKEN", "")
    monkeypatch.delenv("GH_TOKEN")
    argv = ["--engine", "docker", "--", "copilot"]
    with pytest.raises(Exec):
        run_cli(tmp_path, monkeypatch, capsys, argv, GITHUB_TOKEN=TOKEN)
    err = capsys.readouterr().err
    [(engine_argv, engine_env)] = started
    assert TOKEN not in " ".join(engine_argv)
    assert "-e GH_TOKEN -e GITHUB_TOKEN" in " ".join(engine_argv)
    assert engine_env["GH_TOKEN"] == engine_env["GITHUB_TOKEN"] == TOKEN
    assert err.strip().splitlines()[-1].startswith("[Network] Sign-in: GITHUB_TOKEN from the host")
    state = tmp_path / ".config" / "copilot-cli-docker"
    assert state.is_dir() and stat.S_IMODE(state.stat().st_mode) == 0o700
