"""The log guard's repair and hand-over logic, on a scratch directory (needs root for chown)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from runtime import logguard


@pytest.fixture
def guard_env(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.fail("logguard tests need root (chown)", pytrace=False)
    monkeypatch.setenv("SECURE_PROXY_LOGS_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("SECURE_PROXY_COMPONENT_LOG_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "run"))
    (tmp_path / "var").mkdir()
    return tmp_path


def mode_owner(path):
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_creates_then_repairs_owner_and_mode(guard_env):
    uid, gid = 4242, 4343
    first = logguard.check_once(uid, gid)
    assert {r["repair"] for r in first} >= {"created"}
    logs = guard_env / "logs"
    assert mode_owner(logs) == (0o755, uid, gid)
    assert mode_owner(logs / "traffic.jsonl") == (0o644, uid, gid)
    assert logguard.check_once(uid, gid) == []
    os.chown(logs / "traffic.jsonl", 0, 0)
    os.chmod(logs / "traffic.jsonl", 0o666)
    os.chmod(logs, 0o777)
    repairs = logguard.check_once(uid, gid)
    kinds = sorted((r["repair"], os.path.basename(r["path"])) for r in repairs)
    assert kinds == [("mode", "logs"), ("mode", "traffic.jsonl"), ("owner", "traffic.jsonl")]
    assert mode_owner(logs / "traffic.jsonl") == (0o644, uid, gid)


def test_symlink_in_place_of_the_log_is_replaced_not_followed(guard_env):
    logguard.check_once(4242, 4242)
    log = guard_env / "logs" / "traffic.jsonl"
    victim = guard_env / "victim"
    victim.write_text("x")
    log.unlink()
    log.symlink_to(victim)
    repairs = logguard.check_once(4242, 4242)
    assert any(r["repair"] == "replaced non-regular file" for r in repairs)
    assert log.is_file() and not log.is_symlink()
    assert mode_owner(victim)[1] == 0  # the target was never chowned


def test_hand_over_to_puid_pgid(guard_env):
    logguard.check_once(4242, 4242)
    (guard_env / "logs" / "extra.jsonl").write_text("{}\n")
    run = guard_env / "run"
    run.mkdir()
    (run / "session.json").write_text(json.dumps({"puid": 501, "pgid": 20}))
    assert logguard.hand_over() == 2
    for path in (guard_env / "logs", *(guard_env / "logs").iterdir()):
        assert mode_owner(path)[1:] == (501, 20)


def test_record_writes_json_lines(guard_env, capsys):
    logguard.record({"event": "repair", "path": "/logs/traffic.jsonl", "repair": "mode"})
    line = (guard_env / "var" / "logguard.jsonl").read_text().strip()
    assert json.loads(line)["repair"] == "mode"
    assert json.loads(capsys.readouterr().out)["event"] == "repair"
