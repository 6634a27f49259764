"""Trust on first use: approvals in the host state, what counts as changed, the gate."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from runtime.host import trust
from runtime.host.hoststate import StateError, path_key
from runtime.resolve import GLOBAL, REPO

CFG = '{\n  "enabled": true,\n  "mode": "enforce",\n  "allowed_rules": [{"host": "a.test"}]\n}\n'
CFG2 = CFG.replace('"a.test"', '"evil.test"')


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path, Path]:
    state, project, home = tmp_path / "state", tmp_path / "proj", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    return state, project, home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def repo(project: Path) -> Path:
    return project / ".copilot_here/network.json"


def glob(home: Path) -> Path:
    return home / ".copilot_here/network.json"


def test_approval_record_is_private_atomic_and_keyed_by_path(env) -> None:
    state, project, _ = env
    cfg = write(repo(project), CFG)
    approval = trust.approve(state, cfg, CFG.encode())
    record = state / "approvals" / f"{path_key(cfg)}.json"
    data = json.loads(record.read_text())
    assert set(data) == {"path", "sha256", "content", "approved_at"}
    assert data["path"] == str(cfg) and data["content"] == CFG
    assert approval is not None and data["sha256"] == approval.sha256 == trust.sha256(CFG.encode())
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "approvals").stat().st_mode) == 0o700
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # no temp file left
    assert trust.load_approval(state, cfg) == approval


def test_repo_states_new_trusted_changed_removed(env) -> None:
    state, project, _ = env
    cfg = write(repo(project), CFG)
    assert trust.check(state, REPO, cfg).state == trust.NEW
    trust.approve(state, cfg, cfg.read_bytes())
    assert trust.check(state, REPO, cfg).state == trust.TRUSTED
    cfg.write_text(CFG2)  # a hand edit: asked once
    changed = trust.check(state, REPO, cfg)
    assert changed.state == trust.CHANGED
    body = changed.body()
    assert '-  "allowed_rules": [{"host": "a.test"}]' in body
    assert '+  "allowed_rules": [{"host": "evil.test"}]' in body
    assert f"--- {cfg} (approved " in body and f"+++ {cfg} (now)" in body
    cfg.unlink()
    assert trust.check(state, REPO, cfg).state == trust.REMOVED
    trust.approve(state, cfg, None)  # approving the removal forgets the record
    assert trust.check(state, REPO, cfg).state == trust.ABSENT


def test_global_without_record_is_trusted_with_one_must_match(env) -> None:
    state, _, home = env
    cfg = write(glob(home), CFG)
    assert trust.check(state, GLOBAL, cfg).state == trust.TRUSTED
    trust.approve(state, cfg, cfg.read_bytes())
    cfg.write_text(CFG2)
    assert trust.check(state, GLOBAL, cfg).state == trust.CHANGED
    cfg.unlink()
    assert trust.check(state, GLOBAL, cfg).state == trust.REMOVED


def test_a_damaged_record_approves_nothing(env) -> None:
    state, _, home = env
    cfg = write(glob(home), CFG)
    trust.approve(state, cfg, cfg.read_bytes())
    trust.record_path(state, cfg).write_text("{not json")
    assert trust.check(state, GLOBAL, cfg).state == trust.CHANGED


def test_a_planted_symlink_in_the_state_is_refused(env, tmp_path) -> None:
    state, project, _ = env
    cfg = write(repo(project), CFG)
    state.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (state / "approvals").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="symlink"):
        trust.approve(state, cfg, CFG.encode())
    with pytest.raises(StateError, match="symlink"):
        trust.check(state, REPO, cfg)


def test_symlinks_and_special_files_are_refused_not_followed(env, tmp_path) -> None:
    state, project, _ = env
    real = write(tmp_path / "real.json", CFG)
    cfg = repo(project)
    cfg.parent.mkdir()
    cfg.symlink_to(real)
    with pytest.raises(trust.TrustError, match="symlink"):
        trust.check(state, REPO, cfg)
    cfg.unlink()
    os.mkfifo(cfg)  # would hang a plain read
    with pytest.raises(trust.TrustError, match="not a regular file"):
        trust.check(state, REPO, cfg)
    cfg.unlink()
    cfg.parent.rmdir()
    write(tmp_path / "dir/network.json", CFG)
    cfg.parent.symlink_to(tmp_path / "dir")
    with pytest.raises(trust.TrustError, match="real directory"):
        trust.check(state, REPO, cfg)


def test_terminal_control_characters_are_shown_escaped() -> None:
    text = '{"enabled": false}\x1b[2K\x1b[1A\r\u202e{"enabled": true}\n'
    shown = trust.indent(text)
    assert "\x1b" not in shown and "\r" not in shown and "\u202e" not in shown
    assert "\\x1b[2K" in shown and "\\u202e" in shown
    diff = trust.unified_diff("a\n", text, Path("/p"), "t")
    assert "\x1b" not in diff and "\\x1b" in diff


def test_in_use_repo_wins_else_global(env) -> None:
    state, project, home = env
    write(glob(home), CFG)
    assert [(c.kind, c.state) for c in trust.in_use(state, project, home)] == [
        (REPO, trust.ABSENT),
        (GLOBAL, trust.TRUSTED),
    ]
    write(repo(project), CFG)
    assert [(c.kind, c.state) for c in trust.in_use(state, project, home)] == [(REPO, trust.NEW)]


def test_gate_refuses_with_one_message_naming_file_content_and_command(env) -> None:
    state, project, home = env
    cfg = write(repo(project), CFG)
    err = io.StringIO()
    assert not trust.gate(state, project, home, interactive=False, err=err)
    text = err.getvalue()
    assert text.count("not starting the container") == 1
    assert str(cfg) in text and "is new" in text
    assert '    "allowed_rules": [{"host": "a.test"}]' in text
    assert "copilot_here --network-trust" in text
    assert trust.load_approval(state, cfg) is None


def test_gate_on_a_terminal_asks_default_no(env) -> None:
    state, project, home = env
    cfg = write(repo(project), CFG)
    trust.approve(state, cfg, CFG.encode())
    cfg.write_text(CFG2)
    for answer in ("\n", "", "n\n", "nope\n"):
        err = io.StringIO()
        prompts: list[str] = []

        def ask(prompt: str, seen: list[str] = prompts, reply: str = answer) -> str:
            seen.append(prompt)
            return reply

        assert not trust.gate(state, project, home, True, err, ask)
        assert prompts == ["Trust this config? [y/N] "]
        assert "+" in err.getvalue() and "evil.test" in err.getvalue()
        assert "copilot_here --network-trust" in err.getvalue()
    assert trust.check(state, REPO, cfg).state == trust.CHANGED
    assert trust.gate(state, project, home, True, io.StringIO(), lambda _p: "y\n")
    assert trust.check(state, REPO, cfg).state == trust.TRUSTED
    assert trust.load_approval(state, cfg).content == CFG2  # type: ignore[union-attr]


def test_gate_approves_the_bytes_shown_not_a_later_version(env) -> None:
    state, project, home = env
    cfg = write(repo(project), CFG)

    def ask(_prompt: str) -> str:
        cfg.write_text(CFG2)  # swapped while the user reads
        return "y"

    assert trust.gate(state, project, home, True, io.StringIO(), ask)
    assert trust.check(state, REPO, cfg).state == trust.CHANGED


def test_writable_run_records_then_reports_the_agents_change(env) -> None:
    state, _, home = env
    cfg = write(glob(home), CFG)
    assert trust.load_approval(state, cfg) is None
    trust.before_writable_run(state, GLOBAL, cfg)
    assert trust.load_approval(state, cfg).content == CFG  # type: ignore[union-attr]
    assert trust.after_writable_run(state, GLOBAL, cfg) == ""
    cfg.write_text(CFG2)  # the agent's edit
    report = trust.after_writable_run(state, GLOBAL, cfg)
    assert "was changed during this run" in report and str(cfg) in report
    assert '+  "allowed_rules": [{"host": "evil.test"}]' in report
    assert "copilot_here --network-trust" in report
    # A second writable run does not launder the change into an approval.
    trust.before_writable_run(state, GLOBAL, cfg)
    assert trust.check(state, GLOBAL, cfg).state == trust.CHANGED
    cfg.unlink()
    assert "removed" in trust.after_writable_run(state, GLOBAL, cfg)


def test_empty_dir_is_kept_empty_and_listable(env) -> None:
    state, _, _ = env
    path = trust.empty_dir(state)
    assert path == state / "empty" and stat.S_IMODE(path.stat().st_mode) == 0o755
    write(path / "sub/network.json", CFG)
    (path / "link").symlink_to("/etc")
    (path / "network.json").write_text(CFG)
    assert list(trust.empty_dir(state).iterdir()) == []
    assert Path("/etc").is_dir()
