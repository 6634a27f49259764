"""The reloader's validate-compile-write-signal step and its read-only detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.container import reloader
from runtime.resolve import REPO, read_policy


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "run"))
    signals: list[str] = []
    monkeypatch.setattr(reloader, "signal_interceptor", lambda: signals.append("HUP"))
    config = tmp_path / "cfg" / "network.json"
    config.parent.mkdir()
    return config, signals


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
    r = reloader.Reloader(REPO, config)
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
    r = reloader.Reloader(REPO, config)
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
    r = reloader.Reloader(REPO, config)
    r.prime()
    assert r.reload()
    assert signals == []


READ_ONLY = """
import sys
from pathlib import Path
from runtime.container import reloader
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
