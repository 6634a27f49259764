"""The project's GitHub repository on the host: read with the real git from the project's
origin, recorded on first use, and a change (the agent can write .git/config) stops a
run until the user approves it. The CLI passes it on, shows it and approves it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.host import cli as cli_module
from runtime.host import github
from runtime.resolve import GITHUB_REPO_ENV

ROOT = Path(__file__).resolve().parents[2]
PROJ = "https://github.com/octo-org/proj.git"
DROP = "https://github.com/attacker/drop.git"
ENFORCE = {"enabled": True, "mode": "enforce", "inherit_defaults": True}


def git(cwd: Path, *args: str) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def repo(path: Path, origin: str | None = PROJ) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    if origin:
        git(path, "remote", "add", "origin", origin)
    return path


def set_origin(path: Path, url: str) -> None:
    git(path, "remote", "set-url", "origin", url)


# ----------------------------------------------------------------------------- reading


def test_the_origin_as_git_reads_it(tmp_path: Path) -> None:
    project = repo(tmp_path / "p")
    assert github.read_remote(project) == github.Remote(PROJ, "octo-org/proj")
    set_origin(project, "git@github.com:octo-org/proj.git")
    assert github.read_remote(project).repository == "octo-org/proj"
    set_origin(project, "https://user:ghp_secret@github.com/octo-org/proj.git")
    remote = github.read_remote(project)
    assert remote.repository == "octo-org/proj" and "ghp_secret" not in str(remote)


def test_no_repository_says_why(tmp_path: Path) -> None:
    assert "not a git repository" in github.read_remote(tmp_path).why
    project = repo(tmp_path / "none", origin=None)
    assert github.read_remote(project).why == "the project has no origin remote"
    other = repo(tmp_path / "lab", origin="https://gitlab.com/octo-org/proj.git")
    remote = github.read_remote(other)
    assert remote.repository is None and "no github.com repository" in remote.why


def test_a_worktree_reads_its_repositorys_origin(tmp_path: Path) -> None:
    project = repo(tmp_path / "main")
    git(project, "commit", "-q", "--allow-empty", "-m", "x")
    git(project, "worktree", "add", "-q", str(tmp_path / "wt"))
    assert (tmp_path / "wt" / ".git").is_file()
    assert github.read_remote(tmp_path / "wt").repository == "octo-org/proj"


def test_the_callers_git_variables_and_parent_repositories_do_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outer = repo(tmp_path / "outer", origin=DROP)
    inner = outer / "inner"
    inner.mkdir()
    (inner / ".git").write_text("gitdir: /nonexistent\n")  # broken: git must not climb
    assert github.read_remote(inner).repository is None
    project = repo(tmp_path / "p")
    monkeypatch.setenv("GIT_DIR", str(outer / ".git"))
    assert github.read_remote(project).repository == "octo-org/proj"


# ----------------------------------------------------------------------------- the gate


def test_first_use_records_then_a_change_stops_the_run(tmp_path: Path) -> None:
    root, project = tmp_path / "state", repo(tmp_path / "p")
    err = io.StringIO()
    assert github.gate(root, project, True, False, err=err) == {
        "GITHUB_OWNER": "octo-org",
        "GITHUB_REPO": "proj",
    }
    assert "recorded the project's GitHub repository octo-org/proj" in err.getvalue()
    record = json.loads(github.record_path(root, project).read_text())
    assert record["repository"] == "octo-org/proj"
    set_origin(project, DROP)  # what an agent could do during a run
    err = io.StringIO()
    assert github.gate(root, project, True, False, err=err) is None
    text = err.getvalue()
    assert "not starting the container" in text and "it was octo-org/proj" in text
    assert "attacker/drop" in text and "copilot_here --network-trust" in text
    # Asked on a terminal: no (the default) keeps it stopped; yes approves.
    assert github.gate(root, project, True, True, err=io.StringIO(), ask=lambda _: "") is None
    values = github.gate(root, project, True, True, err=io.StringIO(), ask=lambda _: "y")
    assert values == {"GITHUB_OWNER": "attacker", "GITHUB_REPO": "drop"}
    assert github.check(root, project).state == github.TRUSTED


def test_an_origin_added_after_none_was_recorded_is_a_change(tmp_path: Path) -> None:
    root, project = tmp_path / "state", repo(tmp_path / "p", origin=None)
    assert github.gate(root, project, True, False, err=io.StringIO()) == {}
    git(project, "remote", "add", "origin", DROP)
    assert github.gate(root, project, True, False, err=io.StringIO()) is None


def test_a_dry_run_records_nothing(tmp_path: Path) -> None:
    root, project = tmp_path / "state", repo(tmp_path / "p")
    assert github.gate(root, project, True, False, record=False, err=io.StringIO())
    assert github.check(root, project).state == github.NEW


def test_a_change_only_matters_while_a_rule_names_the_repository(tmp_path: Path) -> None:
    root, project = tmp_path / "state", repo(tmp_path / "p")
    github.gate(root, project, False, False, err=io.StringIO())  # recorded even so
    set_origin(project, DROP)
    # Not relevant (rules disabled, say): the run starts, without the unapproved values.
    assert github.gate(root, project, False, False, err=io.StringIO()) == {}
    assert github.gate(root, project, True, False, err=io.StringIO()) is None


def test_removing_the_origin_narrows_and_keeps_the_record(tmp_path: Path) -> None:
    root, project = tmp_path / "state", repo(tmp_path / "p")
    github.gate(root, project, True, False, err=io.StringIO())
    git(project, "remote", "remove", "origin")
    assert github.gate(root, project, True, False, err=io.StringIO()) == {}
    git(project, "remote", "add", "origin", PROJ)
    assert github.gate(root, project, True, False, err=io.StringIO()) == {
        "GITHUB_OWNER": "octo-org",
        "GITHUB_REPO": "proj",
    }


def test_a_damaged_record_approves_no_repository(tmp_path: Path) -> None:
    root, project = tmp_path / "state", repo(tmp_path / "p")
    github.gate(root, project, True, False, err=io.StringIO())
    path = github.record_path(root, project)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "repository": "../x"}))
    assert github.gate(root, project, True, False, err=io.StringIO()) is None
    path.write_text("{")
    assert github.gate(root, project, True, False, err=io.StringIO()) is None


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    project = repo(tmp_path / "project")
    (tmp_path / "home").mkdir()
    share = tmp_path / "share"
    shutil.copytree(ROOT / "config", share)
    (share / "registries.json").write_text('{"npm": ["npm.test"], "pypi": ["pypi.test"]}')
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("SECURE_PROXY_SHARE", str(share))
    cfg = project / ".copilot_here" / "network.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(ENFORCE))
    from runtime.host import hoststate, trust

    trust.approve(hoststate.state_root(tmp_path / "home"), cfg, cfg.read_bytes())

    def call(*args: str) -> tuple[int, str, str]:
        code = cli_module.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    call.project = project  # type: ignore[attr-defined]
    return call


def dry_run(main) -> tuple[int, str, str]:
    return main("--engine", "docker", "--dry-run", "--", "true")


def test_the_run_passes_the_repository_on(main) -> None:
    code, out, err = dry_run(main)
    assert code == 0, err
    assert f"--env={GITHUB_REPO_ENV}=octo-org/proj" in out or (
        f"{GITHUB_REPO_ENV}=octo-org/proj" in out
    )


def test_show_and_check_use_the_filled_defaults(main) -> None:
    code, out, _ = main("--network-show")
    assert code == 0
    assert (
        "GitHub repository: octo-org/proj ({{GITHUB_OWNER}}=octo-org, {{GITHUB_REPO}}=proj), "
        f"from the origin remote {PROJ} of {main.project}; recorded at the next run"
    ) in out
    assert "/octo-org/proj.git/git-receive-pack" in out and "{{" not in out.split("rules (")[1]
    url = "https://github.com/octo-org/proj.git/git-receive-pack"
    code, out, _ = main("--network-check", url, "--method", "POST")
    assert code == 0 and out.startswith("ALLOWED")
    code, out, _ = main("--network-check", url.replace("octo-org/proj", "x/y"), "--method", "POST")
    assert code == 3 and out.startswith("BLOCKED")


def test_show_names_what_drops_out_without_a_repository(main) -> None:
    git(main.project, "remote", "remove", "origin")
    code, out, _ = main("--network-show")
    assert code == 0
    assert "GitHub repository: none (the project has no origin remote)" in out
    assert "Rule paths left out for want of a GitHub repository" in out
    assert "  github.com/{{GITHUB_OWNER}}/{{GITHUB_REPO}}/git-receive-pack" in out


def test_a_changed_origin_is_shown_and_approved_by_network_trust(main) -> None:
    # A dry run records nothing: recorded as a first real run would.
    github.approve(
        Path(os.environ["XDG_STATE_HOME"]) / "copilot_here",
        main.project,
        github.read_remote(main.project),
    )
    set_origin(main.project, DROP)
    code, out, err = dry_run(main)
    assert code == 1 and out == ""
    assert "attacker/drop" in err and "copilot_here --network-trust" in err
    code, out, _ = main("--network-show")
    assert "GitHub repository: NOT APPROVED" in out
    code, out, _ = main("--network-trust")
    assert code == 0
    assert "it was octo-org/proj" in out
    assert "Approved: git push and API writes to attacker/drop" in out
    code, out, err = dry_run(main)
    assert code == 0, err
    assert f"{GITHUB_REPO_ENV}=attacker/drop" in out


def test_a_project_owned_by_another_user_is_read(tmp_path: Path) -> None:
    """git refuses most commands in a repository of another owner; reading the origin
    runs nothing the repository's config could name, so it is read all the same."""
    project = repo(tmp_path / "p")
    for path in (project, *project.rglob("*")):
        os.lchown(path, os.getuid() + 1000, os.getgid() + 1000)
    assert github.read_remote(project).repository == "octo-org/proj"
