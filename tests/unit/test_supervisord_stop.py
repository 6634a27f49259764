"""supervisor.stop against a real supervisord: it ends supervisord and, through it, every
program, group by group, while the init knocks on its socket to wake its loop."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from runtime.container import supervisor

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = ("firewall", "dnsguard", "interceptor")


def write_conf(tmp: Path) -> Path:
    run = tmp / "run"
    sections = [
        "[supervisord]\nnodaemon=true\nsilent=true\n"
        f"logfile={tmp}/supervisord.log\npidfile={run}/supervisord.pid\nchildlogdir={tmp}\n",
        f"[unix_http_server]\nfile={run}/supervisor.sock\nchmod=0700\n",
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
    ]
    for priority, name in enumerate(PROGRAMS):
        sections.append(
            f"[program:{name}]\ncommand=/bin/sh -c 'echo $$ > {tmp}/{name}.pid; exec sleep 60'\n"
            f"priority={10 * (priority + 1)}\nstartsecs=0\nstopwaitsecs=5\n"
            f"stdout_logfile={tmp}/{name}.log\nredirect_stderr=true\n"
        )
    conf = tmp / "supervisord.conf"
    conf.write_text("\n".join(sections))
    return conf


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def test_stop_ends_supervisord_and_every_program(tmp_path, monkeypatch) -> None:
    (tmp_path / "run").mkdir()
    conf = write_conf(tmp_path)
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "run"))
    sup = subprocess.Popen(
        [sys.executable, "-m", "runtime.container.launch", "supervisord", "-c", str(conf)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        pids = {}
        while len(pids) < len(PROGRAMS):
            assert time.monotonic() < deadline, "supervisord did not start its programs"
            assert sup.poll() is None, "supervisord exited"
            supervisor.knock()  # its first poll returns, so it spawns
            for name in PROGRAMS:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    pids[name] = int((tmp_path / f"{name}.pid").read_text())
            time.sleep(0.02)
        assert all(alive(pid) for pid in pids.values())
        reaped: dict[int, int] = {}
        supervisor.stop(sup, reaped)
        assert sup.pid in reaped
        for name, pid in pids.items():
            assert not alive(pid), f"{name} outlived supervisord"
        log = (tmp_path / "supervisord.log").read_text()
        assert all(f"stopped: {name}" in log for name in PROGRAMS), log
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, 9)
            sup.wait(timeout=5)


def test_knocking_where_nothing_listens_is_harmless(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path / "absent"))
    supervisor.knock()  # no socket: nothing raised
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "supervisor.sock").write_text("not a socket")
    supervisor.knock()
