"""The reloader's validate-compile-write-signal step and its read-only detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firewall.ruleset import LockLevel
from runtime.container import reloader, services
from runtime.container.console import SetupFailed
from runtime.policyfile import read_policy
from runtime.resolve import REPO


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "run"))
    signals: list[str] = []

    def signal_services(level):
        signals.append("HUP")
        return []

    monkeypatch.setattr(services, "signal_services", signal_services)
    config = tmp_path / "cfg" / "network.json"
    config.parent.mkdir()
    return config, signals


@pytest.fixture
def switches(monkeypatch):
    seen: list[tuple[LockLevel, LockLevel]] = []
    monkeypatch.setattr(services, "switch", lambda old, new: seen.append((old, new)))
    return seen


def rules(*hosts: str) -> str:
    return json.dumps(
        {
            "enabled": True,
            "inherit_defaults": False,
            "mode": "enforce",
            "allowed_rules": [{"host": h} for h in hosts],
        }
    )


def test_valid_edit_writes_policy_and_signals(env, capsys):
    config, signals = env
    config.write_text(rules("a.example"))
    r = reloader.Reloader(REPO, config, LockLevel.FULL)
    assert r.reload()
    assert [rule.host for rule in read_policy().rules] == ["a.example"]
    assert signals == ["HUP"]
    # unchanged content: nothing to do, no signal
    assert r.reload()
    assert signals == ["HUP"]
    config.write_text(rules("a.example", "b.example"))
    assert r.reload()
    assert len(read_policy().rules) == 2
    assert signals == ["HUP", "HUP"]


def test_invalid_edit_keeps_the_last_good_policy(env, capsys):
    config, signals = env
    config.write_text(rules("a.example"))
    r = reloader.Reloader(REPO, config, LockLevel.FULL)
    r.reload()
    config.write_text('{"enabled": true, "mode": "enforce", "allowed_rules": [{"hots": 1}]}')
    assert not r.reload()
    assert [rule.host for rule in read_policy().rules] == ["a.example"]
    out = capsys.readouterr().out
    assert "invalid edit, keeping the last good policy" in out
    assert str(config) in out
    assert signals == ["HUP"]


def test_primed_digest_skips_the_start_state(env):
    config, signals = env
    config.write_text(rules("a.example"))
    r = reloader.Reloader(REPO, config, LockLevel.FULL)
    r.prime()
    assert r.reload()
    assert signals == []


def test_an_edit_that_changes_the_level_switches_instead_of_signalling(env, switches):
    config, signals = env
    r = reloader.Reloader(REPO, config, LockLevel.NONE)
    steps = [
        (rules("a.example"), LockLevel.FULL),
        (json.dumps({"enabled": False, "log_to_file": True}), LockLevel.INTERCEPT),
        (json.dumps({"enabled": False}), LockLevel.NONE),
        (json.dumps({"enabled": False, "allowed_rules": []}), LockLevel.NONE),
    ]
    for text, level in steps:
        config.write_text(text)
        assert r.reload()
        assert r.level is level
    assert switches == [
        (LockLevel.NONE, LockLevel.FULL),
        (LockLevel.FULL, LockLevel.INTERCEPT),
        (LockLevel.INTERCEPT, LockLevel.NONE),
    ]
    assert signals == ["HUP"]  # the last edit kept the level: a signal, no switch


def test_a_failed_switch_keeps_the_level_and_says_so(env, monkeypatch, capsys):
    config, signals = env

    def fail(old, new):
        raise SetupFailed("the firewall could not move to level full: no NET_ADMIN")

    monkeypatch.setattr(services, "switch", fail)
    r = reloader.Reloader(REPO, config, LockLevel.NONE)
    config.write_text(rules("a.example"))
    assert not r.reload()
    assert r.level is LockLevel.NONE
    assert "NOT in force" in capsys.readouterr().out
    assert read_policy().mode.value == "enforce"  # written: the next edit tries again
    assert signals == []


READ_ONLY = """
import sys
from pathlib import Path
from firewall.ruleset import LockLevel
from runtime.container import reloader, services
from runtime.container.console import SetupFailed
print(reloader.read_only(Path(sys.argv[1])), reloader.read_only(Path(sys.argv[2])))
"""


def test_read_only_detection(tmp_path):
    """A read-only bind mount (as the CLI mounts the config without
    --network-config-write), in a mount namespace of its own, next to a writable dir."""
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    script = f"mount --bind -o ro {ro} {ro} && exec {sys.executable} -c '{READ_ONLY}' {ro} {rw}"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.stdout.split() == ["True", "False"], result.stderr
