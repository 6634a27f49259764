"""From monitor to enforce without editing JSON: the CLI's log, suggest, replay and edit
commands (runtime.host.workflow, logcmds, editcmds), in-process with a temporary
project, HOME and state dir; the waited-for run with a stand-in engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.host import cli as cli_module
from runtime.host import hoststate, trust
from runtime.resolve import GLOBAL, REPO

ROOT = Path(__file__).resolve().parents[2]
AIRLOCK = ROOT / "tests" / "corpus" / "airlock"


class World:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
        self.project = tmp / "project"
        self.home = tmp / "home"
        self.logs = tmp / "logs"
        for d in (self.project, self.home, self.logs):
            d.mkdir()
        share = tmp / "share"
        shutil.copytree(ROOT / "config", share)
        (share / "registries.json").write_text('{"npm": ["npm.test"], "pypi": ["pypi.test"]}')
        self.env = {
            "HOME": str(self.home),
            "XDG_STATE_HOME": str(tmp / "state"),
            "SECURE_PROXY_SHARE": str(share),
            "PYTHONPATH": str(ROOT),
        }
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("VISUAL", raising=False)
        monkeypatch.chdir(self.project)
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.state = hoststate.state_root(self.home)

    def __call__(self, *args: str) -> tuple[int, str, str]:
        try:
            code = cli_module.main(list(args))
        except SystemExit as exc:  # argparse's own usage errors
            code = int(exc.code or 0)
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    @property
    def repo(self) -> Path:
        return self.project / ".copilot_here" / "network.json"

    @property
    def global_file(self) -> Path:
        return self.home / ".copilot_here" / "network.json"

    def write(self, path: Path, data: dict | str, approve: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = data if isinstance(data, str) else json.dumps(data, indent=2) + "\n"
        path.write_text(text)
        if approve:
            trust.approve(self.state, path, text.encode())
        return path

    def log(self, *records: dict) -> Path:
        path = self.logs / "traffic.jsonl"
        with open(path, "a") as handle:
            for r in records:
                handle.write(json.dumps(r) + "\n")
        return path


@pytest.fixture
def w(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> World:
    return World(tmp_path, monkeypatch, capsys)


def request(n: int, host: str, path: str, method: str = "GET", **kw) -> list[dict]:
    """A request's start and end lines, as the interceptor writes them."""
    base = {
        "kind": "http",
        "v": 1,
        "id": f"r{n}",
        "ts": f"2020-06-01T08:00:{n:02d}.000Z",
        "action": "ALLOW",
        "violation": True,
        "mode": "monitor",
        "reason": "host_not_allowed",
        "rule": None,
        "rule_source": None,
        "method": method,
        "scheme": "https",
        "host": host,
        "port": 443,
        "path": path,
        "status": None,
        "http_version": "HTTP/1.1",
        "duration_ms": None,
        "bytes_out": None,
        "bytes_in": None,
    }
    base.update(kw)
    end = {"status": 403 if base["action"] == "BLOCK" else 200, "duration_ms": 1.5}
    end.update({"bytes_out": 0, "bytes_in": 12})
    return [{**base, "phase": "start"}, {**base, "phase": "end", **end}]


MONITOR = {"enabled": True, "inherit_defaults": False, "mode": "monitor", "allowed_rules": []}


def seeded(w: World) -> None:
    w.write(w.repo, {**MONITOR, "allowed_rules": [{"host": "api.github.com"}]})
    w.log(
        *request(1, "example.com", "/docs/a/b"),
        *request(2, "example.com", "/docs/c"),
        *request(3, "uploads.test", "/files", "POST"),
        *request(4, "api.github.com", "/user", violation=False, reason="rule_match"),
        *request(5, "evil.test", "/", action="BLOCK", violation=False, mode="enforce"),
    )


# ----------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blocked"], "--blocked goes with --network-logs"),
        (["--network-suggest", "--json"], "--json goes with --network-logs"),
        (["--network-logs", "--apply"], "--apply goes with --network-suggest"),
        (["--network-suggest", "--accept-widening"], "goes with --network-suggest --apply"),
        (["--network-logs", "--depth", "3"], "--depth goes with --network-suggest"),
        (["--network-suggest", "--depth", "-1"], "--depth needs a value"),
        (["--network-suggest", "--depth=-1"], "--depth takes a number"),
        (["--network-logs", "-f", "--summary"], "do not go together"),
        (["--network-logs", "--method", "GET"], "--method goes with --network-check or"),
        (["--network-mode", "enforce", "--all"], "--all goes with --network-suggest"),
        (["--network-logs", "--global"], "--global goes with --network-allow"),
        (["--network-logs", "--since", "yesterday"], "--since 'yesterday': give a duration"),
        (["--network-allow"], "--network-allow needs a value"),
        (["--network-allow", "https://a.test/x?q=1"], "rules match paths without a query"),
        (["--network-allow", "a.test:8443"], "has a port; rules match hosts on any port"),
        (["--network-allow", "a.test/x y"], "has a query, fragment or space"),
        (["--network-allow", "a.test", "--method", "FETCH!"], "is not an HTTP method"),
        (["--network-check", "https://a.test", "--method", "GET", "--method", "PUT"], "one"),
        (["--network-logs", "--network-suggest"], "not allowed with argument"),
        (["--network-log"], "did you mean --network-logs?"),
        (["network-suggest"], "looks like an option"),
    ],
)
def test_usage_errors_exit_2_and_say_why(w: World, argv: list[str], message: str) -> None:
    code, out, err = w(*argv)
    assert code == 2 and message in err, err
    assert out == "" and not w.repo.exists()


# ----------------------------------------------------------------------------- --network-logs


def test_logs_lines_records_filters_summary_and_dns(w: World) -> None:
    seeded(w)
    w.log({"kind": "dns", "v": 1, "ts": "2020-06-01T08:00:09.000Z", "action": "BLOCK",
           "violation": False, "mode": "enforce", "reason": "host_not_allowed", "rule": None,
           "rule_source": None, "host": "c2.evil.test", "qtype": "A", "transport": "udp",
           "rcode": "NXDOMAIN", "answers": 0, "duration_ms": 0.2})  # fmt: skip
    code, out, err = w("--network-logs", "--logs-dir", str(w.logs))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 5  # one per request, start and end merged
    assert lines[0] == (
        "2020-06-01 08:00:01  VIOLATION GET     example.com/docs/a/b  host_not_allowed 200"
    )
    assert "BLOCK     GET     evil.test/  host_not_allowed 403" in lines[4]
    assert "\x1b[" not in out  # not a terminal: no colour
    code, out, _ = w("--network-logs", "--logs-dir", str(w.logs), "--blocked")
    assert [x.split()[4] for x in out.splitlines()] == ["evil.test/"]
    code, out, _ = w("--network-logs", "--logs-dir", str(w.logs), "--violations", "--blocked")
    assert len(out.splitlines()) == 4
    code, out, _ = w("--network-logs", "--logs-dir", str(w.logs), "--json", "--violations")
    records = [json.loads(x) for x in out.splitlines()]
    assert [r["path"] for r in records] == ["/docs/a/b", "/docs/c", "/files"]
    assert all(r["phase"] == "end" and r["status"] == 200 for r in records)
    code, out, _ = w("--network-logs", "--logs-dir", str(w.logs), "--summary")
    assert out.startswith("example.com: 2 requests, 0 blocked, 2 violations (first 2020-06-01")
    code, out, _ = w("--network-logs", "--logs-dir", str(w.logs), "--dns")
    assert out.splitlines() == [
        "2020-06-01 08:00:09  BLOCK     DNS A     c2.evil.test  host_not_allowed"
    ]
    code, out, err = w(
        "--network-logs", "--logs-dir", str(w.logs), "--since", "2020-06-01T08:00:01"
    )
    assert len(out.splitlines()) == 5
    code, out, err = w("--network-logs", "--logs-dir", str(w.logs), "--since", "1h")
    assert out == "" and f"No requests match in {w.logs / 'traffic.jsonl'}" in err


def test_logs_of_this_project_by_default_and_what_a_missing_or_broken_log_says(w: World) -> None:
    code, out, err = w("--network-logs")
    default = hoststate.state_root(w.home) / "logs"
    assert code == 0 and out == ""
    assert f"No traffic log yet at {default}" in err and "/traffic.jsonl" in err
    w.log(*request(1, "a.test", "/x"))
    with open(w.logs / "traffic.jsonl", "a") as handle:
        handle.write('{"kind": "http", "v": 1, "ts": "2026-')  # a crash mid-line
    code, out, err = w("--network-logs", "--logs-dir", str(w.logs))
    assert code == 0 and len(out.splitlines()) == 1
    assert "note: 1 line(s)" in err and "could not be read" in err


def test_follow_prints_what_is_appended_until_interrupted(w: World, monkeypatch) -> None:
    seeded(w)
    from runtime.host import logview

    ticks = iter(range(3))

    def fake_follow(path, out, render, poll=0.25, keep=None, offset=None):
        appended = [
            *request(7, "late.test", "/new"),
            *request(8, "skip.test", "/x", action="BLOCK", violation=False),
        ]
        for entry in logview.completed([json.dumps(x) for x in appended], {}):
            if keep(entry):
                print(render(entry), file=out)
        for _ in ticks:
            yield
        raise KeyboardInterrupt

    monkeypatch.setattr(logview, "follow", fake_follow)
    code, out, _ = w("--network-logs", "--logs-dir", str(w.logs), "-f", "--violations")
    assert code == 0
    assert out.splitlines()[-1].endswith("VIOLATION GET     late.test/new  host_not_allowed 200")
    assert "skip.test" not in out


# ----------------------------------------------------------------------------- --network-suggest


def test_suggest_shows_a_diff_flags_widening_and_applies_only_what_is_safe(w: World) -> None:
    seeded(w)
    before = w.repo.read_text()
    code, out, err = w("--network-suggest", "--logs-dir", str(w.logs))
    assert code == 0, err
    assert "+ new rule for example.com: /docs/a/, /docs/c; GET (2 requests)" in out
    assert "! new rule for uploads.test: /files; POST (1 request)" in out
    assert "      ! allows writes (POST)" in out
    assert "evil.test" not in out  # blocked in enforce: only with --all
    assert f"--- {w.repo} (now)" in out and f"+++ {w.repo} (suggested)" in out
    assert '+    {"host": "uploads.test", "allowed_paths": ["/files"], "methods": ["POST"]}' in out
    assert w.repo.read_text() == before  # nothing written without --apply
    code, out, err = w("--network-suggest", "--logs-dir", str(w.logs), "--apply")
    assert code == 0, err
    data = json.loads(w.repo.read_text())
    assert list(data) == list(MONITOR)  # key order kept
    assert data["allowed_rules"] == [
        {"host": "api.github.com"},
        {"host": "example.com", "allowed_paths": ["/docs/a/", "/docs/c"], "methods": ["GET"]},
    ]
    assert "Not applied (1, they widen access): uploads.test" in out
    assert "--network-suggest --logs-dir" in out and "--apply --accept-widening" in out
    # The CLI's write is approved: the next run starts under it.
    assert trust.check(w.state, REPO, w.repo).trusted
    code, out, err = w("--network-suggest", "--logs-dir", str(w.logs), "--apply",
                       "--accept-widening")  # fmt: skip
    assert code == 0, err
    assert json.loads(w.repo.read_text())["allowed_rules"][-1]["host"] == "uploads.test"
    code, out, _ = w("--network-suggest", "--logs-dir", str(w.logs))
    assert out.startswith("Nothing to suggest:") and "--all" in out
    code, out, _ = w("--network-suggest", "--logs-dir", str(w.logs), "--all", "--depth", "0")
    assert "new rule for evil.test: every path; GET" in out
    assert "the whole host, for requests to one path" in out


def test_suggest_for_an_airlock_config_asks_for_migration(w: World) -> None:
    w.write(w.repo, (AIRLOCK / "readme-example.json").read_text())
    w.log(*request(1, "example.com", "/x", mode="enforce", action="BLOCK", violation=False))
    code, _, err = w("--network-suggest", "--logs-dir", str(w.logs), "--all", "--apply")
    assert code == 1 and "copilot_here --network-migrate" in err
    assert w.repo.read_text() == (AIRLOCK / "readme-example.json").read_text()


# ----------------------------------------------------------------------------- --network-replay


def test_replay_says_what_would_change_and_exits_3_when_something_breaks(w: World) -> None:
    seeded(w)
    code, out, err = w("--network-replay", "--logs-dir", str(w.logs))
    assert code == 0 and "Unchanged: 5" in out, (out, err)
    w("--network-remove", "api.github.com")
    code, out, err = w("--network-replay", "--logs-dir", str(w.logs))
    assert code == 3, err
    assert "Would now be BLOCKED (1):\n  GET https://api.github.com/user  host_not_allowed" in out
    w("--network-allow", "example.com/docs/", "--method", "GET")
    w("--network-allow", "evil.test")
    w("--network-allow", "api.github.com/user")
    code, out, err = w("--network-replay", str(w.logs / "traffic.jsonl"))  # LOG given
    assert code == 0, (out, err)
    assert "Would now be ALLOWED (3):" in out
    assert "  GET https://example.com/docs/a/b  rule_match (rule: example.com)" in out
    assert "  GET https://evil.test/  rule_match (rule: evil.test)" in out
    assert "uploads.test" not in out and "Unchanged: 2" in out


# ----------------------------------------------------------------------------- edits


def test_allow_remove_and_mode_edit_the_config_in_use_and_record_the_approval(w: World) -> None:
    code, out, err = w("--network-allow", "docs.test/repos/", "--method", "get")
    assert code == 0, err  # no config: a new repo config
    assert json.loads(w.repo.read_text())["allowed_rules"] == [
        {"host": "docs.test", "allowed_paths": ["/repos/"], "methods": ["GET"]}
    ]
    assert "rules are disabled" in out  # the new file says enabled: false
    code, out, _ = w("--network-allow", "DOCS.test/repos/", "--method", "GET")
    assert code == 0 and "Already allowed" in out
    w("--network-allow", "docs.test/user", "--method", "GET")
    w("--network-allow", "https://example.com/")  # a URL: the whole host, every method
    rules = json.loads(w.repo.read_text())["allowed_rules"]
    assert rules[0]["allowed_paths"] == ["/repos/", "/user"] and rules[1] == {"host": "example.com"}
    code, out, _ = w("--network-remove", "docs.test/repos/")
    assert code == 0 and "Removed from" in out
    w("--network-remove", "docs.test/user")  # its last path: the rule goes, never []
    assert json.loads(w.repo.read_text())["allowed_rules"] == [{"host": "example.com"}]
    code, _, err = w("--network-remove", "docs.test")
    assert code == 1 and "nothing removed" in err
    code, out, _ = w("--network-mode", "enforce")
    assert code == 0 and "Mode in" in out and "(was monitor)" in out
    assert json.loads(w.repo.read_text())["mode"] == "enforce"
    # Monitor mode logged; enforce keeps the log on (the end-of-run line reads it).
    assert json.loads(w.repo.read_text())["log_to_file"] is True and "stays on" in out
    assert trust.check(w.state, REPO, w.repo).trusted
    # --global: the global config, created.
    code, _, err = w("--network-allow", "a.test", "--global")
    assert code == 0, err
    assert json.loads(w.global_file.read_text())["allowed_rules"] == [{"host": "a.test"}]
    assert trust.check(w.state, GLOBAL, w.global_file).trusted


def test_allow_keeps_what_built_in_rules_allowed(w: World) -> None:
    w.write(w.repo, {"enabled": True, "mode": "enforce"})
    code, out, err = w("--network-allow", "api.github.com/meta", "--method", "GET")
    assert code == 0, err
    rules = json.loads(w.repo.read_text())["allowed_rules"]
    assert rules[-1] == {"host": "api.github.com", "allowed_paths": ["/meta"], "methods": ["GET"]}
    assert "were copied" in out
    assert w("--network-check", "https://api.github.com/user")[0] == 0  # still allowed
    assert w("--network-check", "https://api.github.com/meta")[0] == 0


def test_a_write_never_leaves_an_invalid_file(w: World) -> None:
    broken = '{"enabled": true, "mode": "enforce", "allowed_rules": [{"host": "*"}]}\n'
    w.write(w.repo, broken)
    for argv in (["--network-mode", "monitor"], ["--network-allow", "a.test"]):
        code, _, err = w(*argv)
        assert code == 1 and "a bare '*' would allow every host" in err
        assert w.repo.read_text() == broken


EDITOR = """#!/bin/sh
n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{count}"
case "{plan}" in
  fix) if [ $n = 1 ]; then sed -i 's/"monitor"/"block"/' "$1"
       else sed -i 's/"block"/"enforce"/' "$1"; fi ;;
  bad) sed -i 's/"monitor"/"block"/' "$1" ;;
  none) : ;;
esac
"""


def editor(w: World, tmp_path: Path, plan: str) -> Path:
    count = tmp_path / f"count-{plan}"
    script = tmp_path / f"editor-{plan}"
    script.write_text(EDITOR.format(count=count, plan=plan))
    script.chmod(0o755)
    w.monkeypatch.setenv("EDITOR", str(script))
    return count


def test_edit_reopens_on_an_invalid_save_and_writes_only_a_valid_file(w, tmp_path) -> None:
    w.write(w.repo, MONITOR)
    count = editor(w, tmp_path, "fix")
    code, out, err = w("--network-edit")
    assert code == 0, err
    assert count.read_text().strip() == "2"  # opened again after the invalid save
    assert '/mode: "block" is not a mode' in err and "(your edit)" in err
    assert json.loads(w.repo.read_text())["mode"] == "enforce"
    assert trust.check(w.state, REPO, w.repo).trusted
    before = w.repo.read_text()
    count = editor(w, tmp_path, "bad")
    w.write(w.repo, MONITOR)
    before = w.repo.read_text()
    code, out, err = w("--network-edit")
    assert code == 1 and count.read_text().strip() == "5" and "is unchanged" in err
    assert w.repo.read_text() == before
    editor(w, tmp_path, "none")
    code, out, _ = w("--network-edit")
    assert code == 0 and "No changes" in out


# ----------------------------------------------------------------------------- Airlock


def test_show_and_migrate_an_airlock_repo_config(w: World) -> None:
    text = (AIRLOCK / "default-airlock-rules.json").read_text()
    w.write(w.repo, text)
    code, out, err = w("--network-show")
    assert code == 0, err
    assert "Format: Airlock (copilot_here's network.json)" in out
    assert 'narrower here: /mode: not set; read as "enforce"' in out
    assert "=/user, =/graphql" in out and "(https)" in out
    code, out, _ = w("--network-allow", "a.test")
    assert code == 1 or "Airlock" in out
    code, out, err = w("--network-migrate")
    assert code == 0, err
    assert "Its native equivalent:" in out and '"=/copilot_internal/user"' in out
    data = json.loads(w.repo.read_text())
    assert data["inherit_defaults"] is True and "enable_logging" not in data
    assert trust.check(w.state, REPO, w.repo).trusted
    code, out, _ = w("--network-migrate")
    assert "already in the native format" in out


def test_copilot_heres_global_airlock_config_is_used_last_and_migrated_to_ours(w: World) -> None:
    airlock = w.home / ".config" / "copilot_here" / "network.json"
    w.write(airlock, (AIRLOCK / "readme-example.json").read_text(), approve=False)
    code, out, _ = w("--network-show")
    assert f"Config source: {airlock} (copilot_here's global Airlock config)" in out
    assert w("--network-check", "https://api.github.com/graphql", "--method", "POST")[0] == 0
    assert w("--network-check", "https://api.github.com/graphql/x")[0] == 3
    assert w("--network-check", "http://api.github.com/graphql", "--method", "POST")[0] == 3
    # A run mounts the translation read-only, never the Airlock file's directory.
    code, out, err = w("--engine", "docker", "--dry-run", "--", "true")
    assert code == 0, err
    assert f"src={w.state / 'airlock-global'},dst=/home/appuser/.copilot_here,readonly" in out
    assert str(airlock.parent) not in out
    code, _, err = w("--engine", "docker", "--dry-run", "--network-config-write", "--", "true")
    assert code == 2 and "--network-migrate" in err
    code, out, err = w("--network-migrate")
    assert code == 0, err
    assert f"Wrote {w.global_file}; {airlock} is left to copilot_here." in out
    assert json.loads(airlock.read_text())["enable_logging"] is False  # untouched
    assert f"Config source: {w.global_file} (global config)" in w("--network-show")[1]


# ----------------------------------------------------------------------------- the run


ENGINE = """#!/bin/sh
# A stand-in for `docker run`: writes to the mounted logs directory as the interceptor would.
for arg in "$@"; do
  case "$arg" in
    --mount=type=bind,src=*,dst=/logs) dir=${arg#--mount=type=bind,src=}; dir=${dir%,dst=*} ;;
  esac
done
[ -n "$LINES" ] && printf '%s\\n' "$LINES" >> "$dir/traffic.jsonl"
trap 'echo TERM-SEEN; exit 7' TERM
echo ENGINE-READY
[ -n "$WAIT" ] && { i=0; while [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; }
exit 5
"""


def fake_engine(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(ENGINE)
    (bin_dir / "docker").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_run_ends_with_one_line_about_what_was_blocked(w: World, tmp_path: Path) -> None:
    w.write(w.repo, {**MONITOR, "mode": "enforce", "allowed_rules": [{"host": "a.test"}]})
    for key, value in fake_engine(tmp_path).items():
        w.monkeypatch.setenv(key, value)
    old = request(1, "old.test", "/", action="BLOCK", violation=False)
    w.log(*old)  # an earlier run's: not this run's
    lines = [*request(2, "evil.test", "/a", action="BLOCK"), *request(3, "evil.test", "/b",
             action="BLOCK"), *request(4, "m.test", "/", violation=True)]  # fmt: skip
    w.monkeypatch.setenv("LINES", "\n".join(json.dumps(x) for x in lines))
    code, _, err = w("--engine", "docker", "--logs-dir", str(w.logs), "--", "true")
    assert code == 5  # the engine's code
    # The start's "[Network] Sign-in:" line aside, one line about this run.
    (line,) = [x for x in err.splitlines() if x.startswith("[Network] ") and "Sign-in" not in x]
    assert line.startswith("[Network] 2 blocked and 1 flagged (monitor) this run: evil.test x2, ")
    assert "old.test" not in line
    assert "See: copilot_here --network-logs --blocked --violations --since 20" in line
    assert line.endswith(f"--logs-dir {w.logs}")
    w.monkeypatch.setenv("LINES", json.dumps(request(5, "a.test", "/", violation=False)[1]))
    code, _, err = w("--engine", "docker", "--logs-dir", str(w.logs), "--", "true")
    assert code == 5 and not [x for x in err.splitlines() if "this run" in x]


def test_a_waited_for_run_passes_sigterm_on_and_exits_with_the_engines_code(
    w: World, tmp_path: Path
) -> None:
    w.write(w.repo, {**MONITOR, "mode": "enforce"})
    env = {**os.environ, **w.env, **fake_engine(tmp_path), "WAIT": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.host.cli", "--engine", "docker", "--", "true"],
        cwd=w.project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ENGINE-READY"
    time.sleep(0.2)  # the trap is set before the line is printed; let the loop start
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 7, err  # the engine's answer to the TERM, not the CLI's death
    assert "TERM-SEEN" in out


CLI = (sys.executable, "-m", "runtime.host.cli")


def test_follow_for_real_until_ctrl_c(w: World) -> None:
    w.log(*request(1, "old.test", "/", action="BLOCK", violation=False))
    with open(w.logs / "traffic.jsonl", "a") as handle:  # a line being written
        handle.write(json.dumps(request(2, "half.test", "/", action="BLOCK")[1])[:30])
    proc = subprocess.Popen(
        [*CLI, "--network-logs", "-f", "--blocked", "--logs-dir", str(w.logs)],
        cwd=w.project,
        env={**os.environ, **w.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert "BLOCK     GET     old.test/  host_not_allowed 403" in proc.stdout.readline()
        time.sleep(0.5)
        with open(w.logs / "traffic.jsonl", "a") as handle:  # the rest of the half line
            handle.write(json.dumps(request(2, "half.test", "/", action="BLOCK")[1])[30:] + "\n")
        w.log(*request(3, "ok.test", "/", violation=False, reason="rule_match"))
        w.log(*request(4, "new.test", "/x", action="BLOCK", violation=False))
        assert "half.test/" in proc.stdout.readline()  # not lost between reading and following
        assert "new.test/x" in proc.stdout.readline()  # ok.test: not blocked, not shown
        proc.send_signal(signal.SIGINT)  # Ctrl-C ends it, quietly
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
