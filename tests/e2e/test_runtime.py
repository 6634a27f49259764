"""The runtime end to end: `copilot_here --engine sandbox` against a test internet.

The sandbox's uplink is the Topology's net host (`--sandbox-netns`), which serves
HTTPS for every test name with a test CA that reaches the interceptor through
SECURE_PROXY_UPSTREAM_CA, exactly as a corporate CA would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.sandbox import (
    Session,
    enforce,
    host_logs,
    request_loop,
    run_cli,
    sh,
    write_config,
)

pytestmark = pytest.mark.e2e


FIREWALL = ["/opt/secure-proxy/venv/bin/secure-proxy-firewall"]
# As supervisor.d/firewall.conf runs it.
FIREWALL_ARGS = [
    *("--proxy-user", "proxy-user", "--policy", "/run/secure-proxy/policy.json"),
    *("--dns-guard-port", "58053"),
]


def curl(url: str) -> str:
    return f"curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 5 {url}"


def traffic(project: Path) -> list[dict]:
    log = host_logs(project) / "traffic.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- policy


def test_first_request_is_judged_v4_and_v6(internet, project):
    write_config(project, enforce("api.github.com", "v6.test"))
    script = "; ".join(
        [
            curl("https://api.github.com/first"),  # the command's very first action
            curl("https://evil.test/"),
            curl("https://v6.test/six"),
            curl("http://evil.test/plain"),
            "stat -c '%U %a' /logs /logs/traffic.jsonl",
        ]
    )
    r = run_cli(project, ["--", *sh(script)], internet)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["200", "403", "200", "403"], (r.stdout, r.stderr)
    assert "proxy-user 755" in r.stdout and "proxy-user 644" in r.stdout
    assert "[Network] Using repo config: /work/.copilot_here/network.json" in r.stderr
    assert "[Network] Rules ENABLED (mode: enforce)" in r.stderr
    lines = traffic(project)
    seen = {(entry.get("host"), str(entry.get("action")).lower()) for entry in lines}
    assert ("api.github.com", "allow") in seen, lines
    assert ("evil.test", "block") in seen, lines
    # After the session the audit trail belongs to the host user (PUID:PGID = 0:0 here).
    logs = host_logs(project)
    for path in (logs, logs / "traffic.jsonl"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), path


def test_no_config_leaves_the_host_untouched(internet, project):
    watched = [Path("/etc/passwd"), Path("/etc/group"), Path("/etc/ssl/certs/ca-certificates.crt")]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in watched}
    sandboxes_before = {n for n in os.listdir("/run/netns") if n.startswith("spsbx-")}
    r = run_cli(project, ["--", *sh("id -un")], internet)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["appuser"], (r.stdout, r.stderr)
    assert traffic(project) == []
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in watched}
    assert before == after
    assert not Path("/ca").exists()
    # Nothing of this run is left behind (other sandboxes may be running concurrently).
    left = {n for n in os.listdir("/run/netns") if n.startswith("spsbx-")} - sandboxes_before
    assert not left


def test_invalid_config_stops_before_anything_runs(internet, project):
    path = write_config(project, enforce("api.github.com"))
    path.write_text('{"enabled": true, "mode": "block-everything"}')
    r = run_cli(project, ["--", "echo", "SHOULD-NOT-RUN"], internet)
    assert r.returncode == 1
    assert "SHOULD-NOT-RUN" not in r.stdout
    assert "mode" in r.stderr and "network.json" in r.stderr, r.stderr


# --------------------------------------------------------------------------- exit codes, tty


@pytest.mark.parametrize(
    ("script", "code"), [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 128 + 15)]
)
def test_exit_code_comes_back(project, script, code):
    r = run_cli(project, ["--", *sh(script)])
    assert r.returncode == code, r.stderr


def test_tty_and_ctrl_c_reach_the_command(project, tmp_path):
    from tests.harness.sandbox import cli_argv, cli_env

    inner = (
        "test -t 0 && test -t 1 && echo IS-A-TTY; trap 'echo GOT-INT; exit 5' INT; "
        "echo READY; sleep 30 & wait"
    )
    cmd = " ".join(
        subprocess.list2cmdline([a]) if " " not in a else "'" + a.replace("'", "'\\''") + "'"
        for a in cli_argv(["--", "sh", "-c", inner])
    )
    proc = subprocess.Popen(
        ["script", "-qfec", cmd, "/dev/null"],
        cwd=project,
        env={**cli_env(), "TERM": "xterm"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin and proc.stdout
    out = b""
    deadline = time.monotonic() + 40
    while b"READY" not in out and time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        out += chunk
    assert b"IS-A-TTY" in out, out
    time.sleep(0.3)
    proc.stdin.write(b"\x03")
    proc.stdin.flush()
    rest, _ = proc.communicate(timeout=30)
    out += rest
    assert b"GOT-INT" in out, out
    assert proc.returncode == 5, out


# --------------------------------------------------------------------------- restarts


def test_interceptor_restart_and_kill9_fail_closed_then_recover(internet, project):
    write_config(project, enforce("api.github.com"))
    urls = ["https://api.github.com/loop", "https://evil.test/loop"]
    with Session(project, ["--", *request_loop(urls, 0.05, 40)], internet) as s:
        s.wait_for(lambda line: line == "LOOP-START")
        fw_before = s.root(["iptables-legacy-save", "-t", "nat"]).stdout

        def phase(action: list[str]) -> list[dict]:
            seen: list[dict] = []
            # healthy first
            s.wait_for(lambda ln: "api.github.com" in ln and '"status": 200' in ln)
            t0 = time.time()
            r = s.root(action)
            assert r.returncode == 0, r.stderr
            while True:
                entry = json.loads(s.wait_for(lambda ln: ln.startswith("{")))
                if entry["t"] < t0:
                    continue
                seen.append(entry)
                if any(e["status"] == 0 for e in seen) and entry["status"] == 200:
                    return seen
                assert time.time() - t0 < 20, seen

        for action in (
            ["supervisorctl", "restart", "interceptor"],
            ["sh", "-c", "kill -9 $(pgrep -x interceptor-0)"],  # a worker: its pool forks it
            ["sh", "-c", "kill -9 $(supervisorctl pid interceptor)"],  # the pool and its workers
        ):
            seen = phase(action)
            # During the outage requests failed (refused), never went around the proxy;
            # the blocked host was never reached.
            assert any(e["status"] == 0 for e in seen)
            assert all(e["status"] in (0, 403) for e in seen if "evil.test" in e["url"]), seen
        assert s.root(["iptables-legacy-save", "-t", "nat"]).stdout.count("-A") == fw_before.count(
            "-A"
        )
        verify = s.root([*FIREWALL, "verify", *FIREWALL_ARGS])
        assert verify.returncode == 0, verify.stdout + verify.stderr


# --------------------------------------------------------------------------- live edits


def _first_after(s: Session, host: str, status: int, since: float, limit: float = 5) -> float:
    """Seconds from `since` until the loop saw `host` answer `status`."""
    while True:
        entry = json.loads(s.wait_for(lambda ln: ln.startswith("{")))
        if entry["t"] >= since and host in entry["url"] and entry["status"] == status:
            return entry["t"] - since
        assert time.time() - since < limit, f"{host} never answered {status}"


def test_live_edits_in_place_and_by_rename(internet, project):
    path = write_config(project, enforce("api.github.com"))
    urls = ["https://example.com/live", "https://evil.test/live"]
    args = ["--network-config-write", "--", *request_loop(urls, 0.05, 40)]
    with Session(project, args, internet) as s:
        s.wait_for(lambda line: line == "LOOP-START")
        _first_after(s, "example.com", 403, 0)

        # In place (same inode), as `echo > file` or most editors without backup.
        t0 = time.time()
        with open(path, "w") as handle:
            handle.write(json.dumps(enforce("api.github.com", "example.com")))
        assert _first_after(s, "example.com", 200, t0) < 1.0

        # By rename, as vim/VS Code save: the file's inode changes.
        t0 = time.time()
        tmp = path.with_name(".network.json.swp")
        tmp.write_text(json.dumps(enforce("api.github.com", "example.com", "evil.test")))
        os.replace(tmp, path)
        assert _first_after(s, "evil.test", 200, t0) < 1.0

        # Invalid edit: the last good policy stays, and the log says what is wrong.
        path.write_text('{"enabled": true, "mode": "enforce", "allowed_rules": [{"hots": 1}]}')
        time.sleep(1.0)
        t0 = time.time()
        _first_after(s, "evil.test", 200, t0)
        log = s.root(["cat", "/var/log/secure-proxy/reloader.log"]).stdout
        assert "invalid edit, keeping the last good policy" in log, log
        assert "hots" in log or "allowed_rules" in log, log

        # ... and the reloader still works afterwards.
        t0 = time.time()
        path.write_text(json.dumps(enforce("api.github.com")))
        assert _first_after(s, "example.com", 403, t0) < 1.0


def test_read_only_config_is_fixed_for_the_session(internet, project):
    path = write_config(project, enforce("api.github.com"))
    script = (
        "if echo '{}' > /work/.copilot_here/network.json 2>/dev/null; then echo RO:WRITABLE; "
        "else echo RO:DENIED; fi; exec "
        + " ".join(f"'{a}'" for a in request_loop(["https://example.com/ro"], 0.1, 30))
    )
    with Session(project, ["--", *sh(script)], internet) as s:
        assert s.wait_for(lambda ln: ln.startswith("RO:")) == "RO:DENIED"
        s.wait_for(lambda line: line == "LOOP-START")
        path.write_text(json.dumps(enforce("api.github.com", "example.com")))  # on the host
        t0 = time.time()
        while time.time() - t0 < 2.0:
            entry = json.loads(s.wait_for(lambda ln: ln.startswith("{")))
            assert entry["status"] == 403, entry
        # Nothing watches a read-only config: no reloader runs.
        assert s.program_states()["reloader"] == "STOPPED"


# --------------------------------------------------------------------------- the user's limits


TAMPER = r"""
try_() {
  name=$1; shift
  if "$@" >/dev/null 2>&1; then echo "$name:ALLOWED"; else echo "$name:denied"; fi
}
L=/logs/traffic.jsonl
try_ write sh -c "echo forged >> $L"
try_ truncate sh -c ": > $L"
try_ rename mv $L /logs/moved.jsonl
try_ delete sh -c "rm -f $L && test ! -e $L"
try_ chmod chmod 666 $L
try_ chown-dir chmod 777 /logs
try_ ca-key sh -c 'cat /var/lib/secure-proxy/mitmproxy/mitmproxy-ca.pem'
try_ ca-key-ls ls /var/lib/secure-proxy/mitmproxy
try_ supervisor-socket PYTHON -c "import socket; s=socket.socket(socket.AF_UNIX); \
  s.connect('/run/secure-proxy/supervisor.sock')"
try_ supervisorctl supervisorctl status
try_ policy sh -c "echo {} > /run/secure-proxy/policy.json"
try_ iptables-flush iptables-legacy -t nat -F
try_ ip6tables-flush ip6tables-legacy -t nat -F
try_ iptables-nft iptables -t nat -F
try_ userns-iptables unshare -r iptables-legacy -t nat -F
echo DONE
"""


def test_appuser_cannot_touch_log_ca_key_supervisor_or_firewall(internet, project):
    from tests.harness import python_bin

    write_config(project, enforce("api.github.com"))
    r = run_cli(project, ["--", *sh(TAMPER.replace("PYTHON", python_bin()))], internet)
    assert r.returncode == 0, r.stderr
    results = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    assert "DONE" in r.stdout
    allowed = {name for name, verdict in results.items() if verdict != "denied"}
    assert not allowed, r.stdout
    # The forged line never made it into the audit trail.
    assert "forged" not in (host_logs(project) / "traffic.jsonl").read_text()


def test_the_command_has_its_own_group_only(internet, project):
    """No supplementary group: the sandbox's /etc/group is the host's (an overlay), where
    the app user may be a host user renamed, and a group such as disk would open the
    host's devices (/dev is the host's). Here the host's /etc/group names the app user
    (and uid 1000's user, whom the init renames to it) in an extra group for the run."""
    import pwd

    group = Path("/etc/group")
    saved = group.read_bytes()
    members = ["appuser"]
    with contextlib.suppress(KeyError):
        members.append(pwd.getpwuid(1000).pw_name)
    write_config(project, enforce("api.github.com"))
    try:
        group.write_bytes(saved + f"sp-test-extra:x:47113:{','.join(members)}\n".encode())
        r = run_cli(project, ["--", *sh("echo GROUPS $(id -G) GID $(id -g); echo END")], internet)
    finally:
        group.write_bytes(saved)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "END" in lines, r.stdout
    [line] = [x for x in lines if x.startswith("GROUPS ")]
    groups, gid = line.removeprefix("GROUPS ").split(" GID ")
    assert groups.split() == [gid], line


def test_logguard_repairs_owner_and_mode_within_a_second(internet, project):
    write_config(project, enforce("api.github.com"))
    with Session(project, ["--", *sh("echo UP; sleep 30")], internet) as s:
        s.wait_for(lambda line: line == "UP")
        state = s.program_states()
        for name in ("interceptor", "logguard", "dnsguard"):  # RUNNING after startsecs
            assert state[name] in ("STARTING", "RUNNING"), state
        # A read-only config fixes the policy: nothing to reload, no ports to open.
        assert state["reloader"] == state["portkeeper"] == "STOPPED", state
        for tamper in (
            ["chown", "root:root", "/logs/traffic.jsonl"],
            ["chmod", "0666", "/logs/traffic.jsonl"],
            ["chmod", "0777", "/logs"],
        ):
            assert s.root(tamper).returncode == 0
            t0 = time.monotonic()
            while True:
                st = s.root(["stat", "-c", "%U %a", "/logs", "/logs/traffic.jsonl"]).stdout
                if st.split("\n")[:2] == ["proxy-user 755", "proxy-user 644"]:
                    break
                assert time.monotonic() - t0 < 1.0, (tamper, st)
                time.sleep(0.05)
        repairs = s.root(["cat", "/var/log/secure-proxy/logguard.jsonl"]).stdout
        events = [json.loads(line) for line in repairs.splitlines()]
        kinds = {(e.get("repair"), e.get("path")) for e in events if e.get("event") == "repair"}
        assert ("owner", "/logs/traffic.jsonl") in kinds, events
        assert ("mode", "/logs/traffic.jsonl") in kinds, events
        assert ("mode", "/logs") in kinds, events


def test_without_net_admin_the_firewall_fails_closed_with_a_clear_message(project):
    write_config(project, enforce("api.github.com"))
    r = run_cli(project, ["--cap-drop", "NET_ADMIN", "--", "echo", "SHOULD-NOT-RUN"])
    assert r.returncode == 1
    assert "SHOULD-NOT-RUN" not in r.stdout
    assert "The firewall could not lock the network" in r.stderr, r.stderr
    assert "--cap-add=NET_ADMIN" in r.stderr, r.stderr
    assert "fail closed" in r.stderr


# --------------------------------------------------------------------------- signals, global config


def test_sigterm_to_the_cli_reaches_the_command_and_its_code_comes_back(project):
    script = "trap 'echo GOT-TERM; exit 7' TERM; echo UP; sleep 30 & wait"
    with Session(project, ["--", *sh(script)]) as s:
        s.wait_for(lambda line: line == "UP")
        t0 = time.monotonic()
        assert s.proc is not None
        s.proc.send_signal(15)
        assert s.wait_for(lambda line: line == "GOT-TERM")
        assert s.wait(timeout=10) == 7
        # well within docker stop's 10 s grace, shutdown of the services included
        assert time.monotonic() - t0 < 8


def test_sigterm_during_start_up_aborts_it_cleanly(internet, project):
    """A signal before the command exists ends the start-up at the next phase: the
    command never runs, supervisord and its services are stopped, the code is 128+N."""
    write_config(project, enforce("api.github.com"))
    args = ["--", "echo", "SHOULD-NOT-RUN"]
    with Session(project, args, internet, env={"SECURE_PROXY_TRACE": "1"}) as s:
        deadline = time.monotonic() + 30
        while "supervisord started" not in s.stderr:
            assert time.monotonic() < deadline, s.stderr
            time.sleep(0.02)
        assert s.proc is not None
        s.proc.send_signal(15)
        assert s.wait(timeout=15) == 128 + 15, s.stderr
        stdout = []
        while (line := s.next_line(timeout=5)) is not None:
            stdout.append(line)
    assert "SHOULD-NOT-RUN" not in stdout
    assert "command exited" not in s.stderr
    assert "supervisord stopped" in s.stderr, s.stderr


def test_global_config_is_used_without_a_repo_config(internet, project, tmp_path):
    home = Path(tempfile.mkdtemp(prefix="sp-home-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        write_config(home, enforce("example.com"))
        r = run_cli(
            project,
            ["--", *sh(curl("https://example.com/") + "; " + curl("https://api.github.com/"))],
            internet,
            env={"HOME": str(home)},
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["200", "403"], (r.stdout, r.stderr)
        assert "[Network] Using global config: /home/appuser/.copilot_here/network.json" in r.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_user_is_told_once_when_the_interceptor_keeps_crashing(internet, project):
    write_config(project, enforce("api.github.com"))
    with Session(project, ["--", *sh("echo UP; sleep 30")], internet) as s:
        s.wait_for(lambda line: line == "UP")
        for _ in range(4):
            s.root(["sh", "-c", "kill -9 $(supervisorctl pid interceptor)"])
            deadline = time.monotonic() + 10
            while "RUNNING" not in s.root(["supervisorctl", "status", "interceptor"]).stdout:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            time.sleep(1.2)  # let init's watcher see each new pid
        deadline = time.monotonic() + 5
        while "keeps crashing" not in s.stderr:
            assert time.monotonic() < deadline, s.stderr
            time.sleep(0.2)
        assert s.stderr.count("keeps crashing") == 1
