"""The host CLI with a temporary HOME, state dir and project dir: as a subprocess,
and in-process (main()) for the trust messages."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.host import cli as cli_module

ROOT = Path(__file__).resolve().parents[2]


class CLI:
    def __init__(self, tmp: Path, registries: bool = True) -> None:
        self.project = tmp / "project"
        self.home = tmp / "home"
        self.project.mkdir()
        self.home.mkdir()
        share = tmp / "share"
        shutil.copytree(ROOT / "config", share)
        if registries:  # as the installer records them in an image
            (share / "registries.json").write_text('{"npm": ["npm.test"], "pypi": ["pypi.test"]}')
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "XDG_STATE_HOME": str(tmp / "state"),
            "PYTHONPATH": str(ROOT),
            "SECURE_PROXY_SHARE": str(share),
        }

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime.host.cli", *args],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    @property
    def repo_file(self) -> Path:
        return self.project / ".copilot_here/network.json"

    @property
    def global_file(self) -> Path:
        return self.home / ".copilot_here/network.json"


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def test_init_writes_seed_template_and_never_overwrites(cli: CLI) -> None:
    r = cli("--network-init")
    assert r.returncode == 0, r.stderr
    assert json.loads(cli.repo_file.read_text()) == {
        "enabled": False,
        "inherit_defaults": True,
        "mode": "monitor",
        "log_to_file": False,
        "allowed_rules": [],
    }
    cli.repo_file.write_text('{"enabled": true}')
    r = cli("--network-init")
    assert r.returncode == 0 and str(cli.repo_file) in r.stdout and "--force" in r.stdout
    assert cli.repo_file.read_text() == '{"enabled": true}'
    r = cli("--network-init", "--no-inherit", "--force")
    data = json.loads(cli.repo_file.read_text())
    assert data["inherit_defaults"] is False
    assert [x["host"] for x in data["allowed_rules"]] == [
        "github.com",
        "api.github.com",
        "copilot-proxy.githubusercontent.com",
    ]


def test_init_global(cli: CLI) -> None:
    assert cli("--network-init-global").returncode == 0
    assert json.loads(cli.global_file.read_text())["enabled"] is False
    assert not cli.repo_file.exists()


def test_show_defaults(cli: CLI) -> None:
    r = cli("--network-show")
    assert r.returncode == 0, r.stderr
    assert "built-in defaults" in r.stdout
    assert "allow-all" in r.stdout
    assert "Traffic log: off" in r.stdout


def test_show_repo_config_with_origins_and_forced_logging(cli: CLI) -> None:
    cli.repo_file.parent.mkdir()
    cli.repo_file.write_text(
        json.dumps(
            {
                "enabled": True,
                "allowed_rules": [
                    {"host": "api.github.com", "allowed_paths": ["/repos/"], "methods": ["GET"]}
                ],
            }
        )
    )
    r = cli("--network-show")
    out = r.stdout
    assert f"Config source: {cli.repo_file} (repo config)" in out
    assert "mode: monitor" in out and "forced by monitor mode" in out
    assert "read-only" in out
    line = next(x for x in out.splitlines() if "api.github.com" in x)
    assert "/repos/" in line and "GET" in line and str(cli.repo_file) in line
    assert any("github.com" in x and "[built-in]" in x for x in out.splitlines())
    assert "npm.test" in out
    assert "writable" in cli("--network-show", "--network-config-write").stdout


def test_enable_disable_preserve_other_fields_and_order(cli: CLI) -> None:
    cli.global_file.parent.mkdir()
    original = {
        "log_to_file": True,
        "allowed_rules": [{"host": "x.test"}],
        "mode": "enforce",
        "enabled": False,
    }
    cli.global_file.write_text(json.dumps(original))
    r = cli("--network-enable")  # no repo config: acts on the global one
    assert r.returncode == 0, r.stderr
    data = json.loads(cli.global_file.read_text())
    assert list(data) == list(original) and data["enabled"] is True
    assert data["allowed_rules"] == original["allowed_rules"]
    assert not cli.repo_file.exists()
    assert cli("--network-disable-global").returncode == 0
    assert json.loads(cli.global_file.read_text())["enabled"] is False


def test_enable_without_any_config_creates_repo_config(cli: CLI) -> None:
    r = cli("--network-enable")
    assert r.returncode == 0 and "created" in r.stdout
    assert json.loads(cli.repo_file.read_text())["enabled"] is True
    assert cli("--network-enable-global").returncode == 0
    assert json.loads(cli.global_file.read_text())["enabled"] is True


def test_enable_refuses_to_rewrite_a_broken_file(cli: CLI) -> None:
    cli.repo_file.parent.mkdir()
    cli.repo_file.write_text('{"enabled": false, "mode": "strict"}')
    r = cli("--network-enable")
    assert r.returncode == 1
    assert f"{cli.repo_file}: /mode" in r.stderr and "Fix:" in r.stderr
    assert cli.repo_file.read_text() == '{"enabled": false, "mode": "strict"}'


def test_check_uses_the_core(cli: CLI) -> None:
    cli.repo_file.parent.mkdir()
    cli.repo_file.write_text(
        json.dumps(
            {
                "enabled": True,
                "mode": "enforce",
                "allowed_rules": [{"host": "api.github.com", "allowed_paths": ["/repos/"]}],
            }
        )
    )
    r = cli("--network-check", "https://api.github.com/repos/../admin?x=1")
    assert r.returncode == 3  # blocked
    assert r.stdout.startswith("BLOCKED") and "path_not_allowed" in r.stdout
    r = cli("--network-check", "https://api.github.com/repos/a", "--method", "post")
    assert r.returncode == 0  # allowed
    assert r.stdout.startswith("ALLOWED: POST") and "rule: api.github.com" in r.stdout
    r = cli("--network-check", "http://evil.test/")
    assert r.returncode == 3
    assert "host_not_allowed" in r.stdout and '"host": "evil.test"' in r.stdout
    # The fix names the config file by its host path.
    assert f"in {cli.repo_file}: " in r.stdout


def test_check_in_monitor_mode_exits_3_when_enforce_would_block(cli: CLI) -> None:
    cli.repo_file.parent.mkdir()
    cli.repo_file.write_text('{"enabled": true, "mode": "monitor", "inherit_defaults": false}')
    r = cli("--network-check", "https://evil.test/")
    assert r.returncode == 3 and r.stdout.startswith("ALLOWED (monitor mode")
    cli.repo_file.write_text('{"enabled": false}')
    assert cli("--network-check", "https://evil.test/").returncode == 0  # allow-all


@pytest.mark.parametrize("method", ["GET POST", "", "G\nET", "GET/1", "x" * 40, "ÄÖ"])
def test_method_takes_only_http_method_tokens(cli: CLI, method: str) -> None:
    r = cli("--network-check", "https://a.test/", "--method", method)
    assert r.returncode == 2 and "is not an HTTP method" in r.stderr and r.stdout == ""


def test_method_without_check_is_a_usage_error(cli: CLI) -> None:
    assert cli("--method", "GET", "--dry-run").returncode == 2


TOOL = """#!/bin/sh
echo "$0 $*" >> {marker}
echo https://tool-answer.test/
"""


def test_a_host_install_lists_no_registry_hosts_and_runs_no_tool(tmp_path: Path) -> None:
    """No registries.json (a host install): npm and pip are never asked; the CLI says
    the registry hosts are the image's, recorded at install time."""
    cli = CLI(tmp_path, registries=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "tools-ran"
    for tool in ("npm", "pip", "pip3"):
        (bin_dir / tool).write_text(TOOL.format(marker=marker))
        (bin_dir / tool).chmod(0o755)
    cli.env["PATH"] = f"{bin_dir}:{cli.env['PATH']}"
    cli.repo_file.parent.mkdir()
    cli.repo_file.write_text('{"enabled": true, "mode": "enforce"}')
    show = cli("--network-show")
    check = cli("--network-check", "https://pkg.registry.test/x")
    assert show.returncode == 0 and check.returncode == 3, (show.stderr, check.stderr)
    for out in (show.stdout, check.stdout):
        assert "recorded in the image at install time" in out, out
        assert "npm, pypi" in out and "tool-answer.test" not in out
    assert "github.com" in show.stdout  # the other built-in rules are listed
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"enabled": true,}', "line 1, column 18"),
        ('{"allowedHosts": []}', 'rename it to "allowed_rules"'),
        ('{"enabled": "yes"}', "/enabled"),
        ('{"allowed_rules": [{"host": "GitHub.com:443"}]}', 'write "host": "github.com"'),
        ('{"allowed_rules": [{"host": "10.0.0.0/8"}]}', "CIDR ranges are not supported"),
        ('{"allowed_rules": [{"host": "2001:db8::/32"}]}', "CIDR ranges are not supported"),
        ('{"allowed_rules": [{"host": "x.test/8"}]}', "is a URL, not a host"),
    ],
)
def test_config_errors_exit_1_and_name_file_field_fix(cli: CLI, content: str, needle: str) -> None:
    cli.repo_file.parent.mkdir()
    cli.repo_file.write_text(content)
    r = cli("--network-show")
    assert r.returncode == 1
    assert str(cli.repo_file) in r.stderr and needle in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--network-show", "--network-init"],
        ["--bogus"],
        ["--force"],
        ["--network-check", "ftp://x.test/"],
    ],
)
def test_usage_errors_exit_2(cli: CLI, args: list[str]) -> None:
    assert cli(*args).returncode == 2


# --------------------------------------------------------------------------- trust (in-process)


class Main:
    """cli.main() in this process, in a temporary project, HOME and state dir."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
        self.cli = CLI(tmp)
        self.state = tmp / "state"
        self.capsys = capsys
        monkeypatch.chdir(self.cli.project)
        for key in ("HOME", "XDG_STATE_HOME", "SECURE_PROXY_SHARE"):
            monkeypatch.setenv(key, self.cli.env[key])

    def __call__(self, *args: str) -> tuple[int, str, str]:
        code = cli_module.main(list(args))
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def run(self) -> tuple[int, str, str]:
        """A run as far as it goes without an engine: the dry run."""
        return self("--engine", "docker", "--dry-run", "--", "echo", "hi")

    def write(self, path: Path, data: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


@pytest.fixture
def main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Main:
    return Main(tmp_path, monkeypatch, capsys)


CLONED = {"enabled": False, "allowed_rules": [{"host": "exfil.test"}]}
TRUST_CMD = "copilot_here --network-trust"


def test_a_new_repo_config_stops_the_run_even_a_dry_run(main: Main) -> None:
    cfg = main.write(main.cli.repo_file, CLONED)
    code, out, err = main.run()
    assert code == 1
    assert out == ""  # not even the argv
    assert f"the repo config {cfg} is new" in err
    assert '    "enabled": false,' in err and "exfil.test" in err
    assert err.count(TRUST_CMD) == 1


def test_network_trust_shows_the_content_approves_and_the_run_starts(main: Main) -> None:
    cfg = main.write(main.cli.repo_file, CLONED)
    code, out, _ = main("--network-trust")
    assert code == 0
    assert "exfil.test" in out and f"Approved {cfg}" in out
    code, out, err = main.run()
    assert code == 0, err
    assert out.startswith("docker run")
    assert f"--mount=type=bind,src={cfg.parent},dst=/work/.copilot_here,readonly" in out
    code, out, _ = main("--network-trust")
    assert code == 0 and out == f"Nothing to approve: the repo config {cfg} is trusted.\n"


def test_a_changed_repo_config_shows_the_diff(main: Main) -> None:
    cfg = main.write(main.cli.repo_file, CLONED)
    main("--network-trust")
    main.write(cfg, {**CLONED, "enabled": True})  # edited by hand: asked once
    code, _, err = main.run()
    assert code == 1
    assert f"the repo config {cfg} changed since you approved it" in err
    assert '-  "enabled": false,' in err and '+  "enabled": true,' in err
    # a diff: the unchanged rule is context, not an addition
    assert not [x for x in err.splitlines() if "exfil.test" in x and x[:1] in "+-"]
    code, out, _ = main("--network-trust")
    assert code == 0 and '+  "enabled": true,' in out
    assert main.run()[0] == 0


def test_nothing_to_approve_without_any_config(main: Main) -> None:
    code, out, _ = main("--network-trust")
    assert code == 0 and "Nothing to approve: no config file" in out


def test_cli_writes_are_approved(main: Main) -> None:
    assert main("--network-init")[0] == 0
    assert main.run()[0] == 0
    assert main("--network-enable")[0] == 0
    assert main.run()[0] == 0
    assert main("--network-init", "--force", "--no-inherit")[0] == 0
    assert main.run()[0] == 0


def test_enable_on_an_unreviewed_config_does_not_approve_it(main: Main) -> None:
    main.write(main.cli.repo_file, CLONED)
    code, out, _ = main("--network-enable")
    assert code == 0 and "not trusted" in out and TRUST_CMD in out
    assert json.loads(main.cli.repo_file.read_text())["enabled"] is True
    code, _, err = main.run()
    assert code == 1 and "exfil.test" in err
    # --force replaces the whole file with the CLI's template: that is approved.
    assert main("--network-init", "--force")[0] == 0
    assert main.run()[0] == 0


def test_global_config_needs_no_approval_until_it_has_a_record(main: Main) -> None:
    gfile = main.write(main.cli.global_file, CLONED)
    assert main.run()[0] == 0  # the user's own file, never touched by a run
    assert "needs no approval" in main("--network-show")[1]
    assert main("--network-enable-global")[0] == 0  # a CLI write records it
    assert main.run()[0] == 0
    main.write(gfile, {**CLONED, "mode": "monitor"})
    code, _, err = main.run()
    assert code == 1 and f"the global config {gfile} changed" in err and '+  "mode"' in err
    code, out, _ = main("--network-trust")
    assert code == 0 and f"Approved {gfile}" in out
    assert main.run()[0] == 0


def test_a_removed_config_is_a_change_too(main: Main) -> None:
    main.write(main.cli.global_file, {"enabled": True, "mode": "enforce"})
    assert main("--network-enable-global")[0] == 0
    main.cli.global_file.unlink()  # the next run would be allow-all
    code, _, err = main.run()
    assert code == 1 and "removed" in err and "allow-all" in err
    code, out, _ = main("--network-trust")
    assert code == 0 and "stays removed" in out
    assert main.run()[0] == 0


def test_show_reports_trust(main: Main) -> None:
    cfg = main.write(main.cli.repo_file, CLONED)
    code, out, _ = main("--network-show")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("Trust:"))
    assert "NOT TRUSTED" in line and str(cfg) in line and TRUST_CMD in line
    main("--network-trust")
    line = next(x for x in main("--network-show")[1].splitlines() if x.startswith("Trust:"))
    assert line.startswith(f"Trust: {cfg} is trusted (approved ")


def test_trust_refuses_a_broken_config_and_approves_nothing(main: Main) -> None:
    main.cli.repo_file.parent.mkdir()
    main.cli.repo_file.write_text('{"enabled": true, "mode": "strict"}')
    code, out, err = main("--network-trust")
    assert code == 1 and "/mode" in err and "strict" in out
    assert not (main.state / "approvals").exists() or not any((main.state / "approvals").iterdir())


def test_a_symlinked_repo_config_is_refused(main: Main, tmp_path: Path) -> None:
    target = main.write(tmp_path / "elsewhere.json", CLONED)
    main.cli.repo_file.parent.mkdir()
    main.cli.repo_file.symlink_to(target)
    code, _, err = main.run()
    assert code == 1 and "symlink" in err and str(main.cli.repo_file) in err


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "approved"), [("\n", False), ("n\n", False), ("", False)])
def test_on_a_terminal_the_run_asks_default_no(
    main: Main, monkeypatch: pytest.MonkeyPatch, answer: str, approved: bool
) -> None:
    cfg = main.write(main.cli.repo_file, CLONED)
    err = Tty()
    monkeypatch.setattr(sys, "stdin", Tty(answer))
    monkeypatch.setattr(sys, "stderr", err)
    code = cli_module.main(["--engine", "docker", "--", "echo", "hi"])  # no dry run: it asks
    assert code == 1
    text = err.getvalue()
    assert "Trust this config? [y/N] " in text and str(cfg) in text and "exfil.test" in text
    assert main("--network-show")[1].count("NOT TRUSTED") == 1


FAKE_ENGINE = """#!/bin/sh
# A stand-in for `docker run`: acts as the agent on the writable global config mount.
for arg in "$@"; do
  case "$arg" in
    --mount=type=bind,src=*,dst=/home/appuser/.copilot_here)
      dir=${arg#--mount=type=bind,src=}; dir=${dir%,dst=*} ;;
  esac
done
echo '{"enabled": false}' > "$dir/network.json"
echo "ENGINE-RAN $$"
exit 3
"""


def test_a_writable_run_is_waited_for_and_reports_the_agents_edit(
    main: Main, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gfile = main.write(main.cli.global_file, {"enabled": True, "mode": "enforce"})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_ENGINE)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code = cli_module.main(["--engine", "docker", "--network-config-write", "--", "x"])
    err = main.capsys.readouterr().err
    assert code == 3  # the engine's code: waited for, not exec'd (or this test would end)
    assert f"the global config {gfile} was changed during this run" in err
    assert '+{"enabled": false}' in err and TRUST_CMD in err
    code, _, err = main.run()
    assert code == 1 and f"the global config {gfile} changed since you approved it" in err


def test_check_ssh_and_tcp_say_whether_a_rules_ports_open_the_port(cli: CLI) -> None:
    cli.repo_file.parent.mkdir()
    rules = [{"host": "*.example.com", "ports": [22, 5432]}, {"host": "api.github.com"}]
    cli.repo_file.write_text(
        json.dumps({"enabled": True, "mode": "enforce", "allowed_rules": rules})
    )
    # The built-in SSH rule for github.com (inherit_defaults), in its three spellings.
    for url in ("ssh://github.com", "ssh://git@github.com:22/x.git", "git@github.com:o/r.git"):
        r = cli("--network-check", url)
        assert r.returncode == 0, (url, r.stdout, r.stderr)
        assert r.stdout.startswith(f"ALLOWED: TCP github.com:22 ({url})"), r.stdout
        assert "rule: github.com ports 22 (built-in)" in r.stdout
    r = cli("--network-check", "tcp://db.example.com:5432")
    assert r.returncode == 0 and "rule: *.example.com ports 22, 5432" in r.stdout, r.stdout
    r = cli("--network-check", "tcp://db.example.com:6379")
    assert r.returncode == 3 and r.stdout.startswith("BLOCKED: TCP db.example.com:6379"), r.stdout
    assert "reason: port_not_allowed" in r.stdout
    assert '{"host": "db.example.com", "ports": [22, 5432, 6379]}' in r.stdout
    r = cli("--network-check", "ssh://api.github.com")  # an HTTP rule opens no port
    assert r.returncode == 3 and "rule: none" in r.stdout, r.stdout
    for url, says in (
        ("tcp://db.example.com", "write the port"),
        ("tcp://github.com:443", "judged per request: check https://github.com/path"),
        ("tcp://github.com:53", "always the DNS guard's"),
    ):
        r = cli("--network-check", url)
        assert r.returncode == 2 and says in r.stderr, (url, r.stderr)


def test_show_lists_the_ports_of_each_rule(cli: CLI) -> None:
    cli.repo_file.parent.mkdir()
    rules = [
        {"host": "git.example.com", "ports": [22]},
        {"host": "db.test", "ports": [5432], "allowed_paths": []},
    ]
    cli.repo_file.write_text(
        json.dumps({"enabled": True, "mode": "enforce", "allowed_rules": rules})
    )
    out = cli("--network-show").stdout
    (git,) = [x for x in out.splitlines() if x.strip().startswith("git.example.com")]
    assert "no HTTP" in git and "ports 22" in git and "[" in git, out
    (db,) = [x for x in out.splitlines() if x.strip().startswith("db.test")]
    assert "all paths" in db and "ports 5432" in db, out
    (gh,) = [x for x in out.splitlines() if "github.com" in x and "ports 22" in x]
    assert "built-in" in gh, out
