"""The log guard's repair and hand-over logic, on a scratch directory (needs root for chown)."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest

from runtime.container import logguard
from runtime.container.session import Session
from runtime.resolve import BUILT_IN


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


def _session(guard_env, puid: int = 501, pgid: int = 20) -> None:
    Session(BUILT_IN, None, None, puid, pgid, puid or 1000, pgid or 1000).write()


def test_no_session_file_means_no_hand_over(guard_env):
    logguard.check_once(4242, 4242)
    with pytest.raises(logguard.HandOverError, match=r"session\.json"):
        logguard.hand_over()
    assert mode_owner(guard_env / "logs")[1:] == (4242, 4242)


def test_hand_over_gives_the_dir_and_the_log_to_puid_pgid_and_nothing_else(guard_env):
    logguard.check_once(4242, 4242)
    logs = guard_env / "logs"
    victim = guard_env / "victim"
    victim.mkdir()
    (victim / "secret").write_text("s")
    os.chown(victim, 7000, 7000)
    os.chown(victim / "secret", 7000, 7000)
    # Whatever else is in /logs (planted or not) keeps its owner: a file, a
    # directory with a file, a symlink to a directory outside.
    (logs / "extra.jsonl").write_text("{}\n")
    os.chown(logs / "extra.jsonl", 6000, 6000)
    (logs / "d").mkdir()
    (logs / "d" / "f").write_text("x")
    os.chown(logs / "d" / "f", 6000, 6000)
    os.symlink(victim, logs / "link")
    os.chown(logs / "link", 6000, 6000, follow_symlinks=False)
    _session(guard_env)
    done = logguard.hand_over()
    assert sorted(done) == sorted([str(logs), str(logs / "traffic.jsonl")])
    assert mode_owner(logs)[1:] == (501, 20)
    assert mode_owner(logs / "traffic.jsonl")[1:] == (501, 20)
    assert mode_owner(logs / "extra.jsonl")[1:] == (6000, 6000)
    assert mode_owner(logs / "d" / "f")[1:] == (6000, 6000)
    assert mode_owner(logs / "d")[1:] == (0, 0)
    assert mode_owner(logs / "link")[1:] == (6000, 6000)
    assert mode_owner(victim)[1:] == (7000, 7000)
    assert mode_owner(victim / "secret")[1:] == (7000, 7000)


def test_hand_over_refuses_a_symlink_in_place_of_the_log(guard_env):
    logguard.check_once(4242, 4242)
    log = guard_env / "logs" / "traffic.jsonl"
    victim = guard_env / "victim"
    victim.write_text("v")
    os.chown(victim, 7000, 7000)
    log.unlink()
    log.symlink_to(victim)
    _session(guard_env)
    with pytest.raises(logguard.HandOverError, match=r"traffic\.jsonl"):
        logguard.hand_over()
    assert mode_owner(victim)[1:] == (7000, 7000)
    assert mode_owner(log)[1:] == (0, 0)  # the link itself untouched as well


def test_hand_over_refuses_a_hard_link_and_a_fifo(guard_env):
    logguard.check_once(4242, 4242)
    log = guard_env / "logs" / "traffic.jsonl"
    other = guard_env / "other"
    other.write_text("o")
    os.chown(other, 7000, 7000)
    log.unlink()
    os.link(other, log)  # chowning the log would chown this file too
    _session(guard_env)
    with pytest.raises(logguard.HandOverError, match="one link"):
        logguard.hand_over()
    assert mode_owner(other)[1:] == (7000, 7000)
    log.unlink()
    os.mkfifo(log)  # must not block the exit (O_NONBLOCK), nor be handed over
    with pytest.raises(logguard.HandOverError, match="regular file"):
        logguard.hand_over()


def test_hand_over_refuses_a_symlink_in_place_of_the_logs_dir(guard_env):
    victim = guard_env / "victim"
    victim.mkdir()
    os.chown(victim, 7000, 7000)
    (guard_env / "logs").symlink_to(victim)
    _session(guard_env)
    with pytest.raises(logguard.HandOverError):
        logguard.hand_over()
    assert mode_owner(victim)[1:] == (7000, 7000)


def test_hand_over_without_a_log_gives_the_dir_only(guard_env):
    (guard_env / "logs").mkdir()
    _session(guard_env, 501, 20)
    assert logguard.hand_over() == [str(guard_env / "logs")]
    assert mode_owner(guard_env / "logs")[1:] == (501, 20)


def test_the_guard_itself_never_hands_over_on_stop(guard_env, monkeypatch):
    """One owner of the hand-over: init, after the command's processes are gone."""
    logguard.check_once(4242, 4242)
    _session(guard_env)
    monkeypatch.setattr(logguard, "proxy_ids", lambda: (4242, 4242))
    calls = []
    monkeypatch.setattr(logguard, "hand_over", lambda: calls.append(1) or [])
    real_check = logguard.check_once

    def check_then_stop(uid, gid):
        os.kill(os.getpid(), signal.SIGTERM)  # as supervisord stops it
        return real_check(uid, gid)

    monkeypatch.setattr(logguard, "check_once", check_then_stop)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert logguard.main([]) == 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert calls == []
    assert mode_owner(guard_env / "logs" / "traffic.jsonl")[1:] == (4242, 4242)


def test_repairs_go_through_a_descriptor_not_a_swapped_in_symlink(guard_env, monkeypatch):
    """A symlink swapped in between the lstat and the repair fails the open (O_NOFOLLOW)."""
    logguard.check_once(4242, 4242)
    log = guard_env / "logs" / "traffic.jsonl"
    victim = guard_env / "victim"
    victim.write_text("v")
    os.chmod(log, 0o666)
    real_open = logguard._open

    def swap_then_open(path, kind):
        if path == log:
            log.unlink()
            log.symlink_to(victim)
        return real_open(path, kind)

    monkeypatch.setattr(logguard, "_open", swap_then_open)
    with pytest.raises(OSError):
        logguard.check_once(4242, 4242)
    assert mode_owner(victim) == (0o644, 0, 0)


def test_record_writes_json_lines(guard_env, capsys):
    logguard.record({"event": "repair", "path": "/logs/traffic.jsonl", "repair": "mode"})
    line = (guard_env / "var" / "logguard.jsonl").read_text().strip()
    assert json.loads(line)["repair"] == "mode"
    assert json.loads(capsys.readouterr().out)["event"] == "repair"
