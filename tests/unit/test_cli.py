"""The host CLI, run as a subprocess with a temporary HOME and project dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class CLI:
    def __init__(self, tmp: Path) -> None:
        self.project = tmp / "project"
        self.home = tmp / "home"
        self.project.mkdir()
        self.home.mkdir()
        share = tmp / "share"
        shutil.copytree(ROOT / "config", share)
        (share / "registries.json").write_text('{"npm": ["npm.test"], "pypi": ["pypi.test"]}')
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "PYTHONPATH": str(ROOT),
            "SECURE_PROXY_SHARE": str(share),
        }

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime.cli", *args],
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
    assert r.returncode == 0
    assert r.stdout.startswith("BLOCKED") and "path_not_allowed" in r.stdout
    r = cli("--network-check", "https://api.github.com/repos/a", "--method", "post")
    assert r.stdout.startswith("ALLOWED: POST") and "rule: api.github.com" in r.stdout
    r = cli("--network-check", "http://evil.test/")
    assert "host_not_allowed" in r.stdout and '"host": "evil.test"' in r.stdout


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"enabled": true,}', "line 1, column 18"),
        ('{"allowedHosts": []}', 'rename it to "allowed_rules"'),
        ('{"enabled": "yes"}', "/enabled"),
        ('{"allowed_rules": [{"host": "GitHub.com:443"}]}', 'write "host": "github.com"'),
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
