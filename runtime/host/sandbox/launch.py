"""The host side of a sandbox run: check the host can make one, create the network,
start PID 1 in new namespaces, pass signals on, and undo everything at exit."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from runtime.host.sandbox.network import REGISTRY, Network, cleanup_leftovers, starttime
from runtime.host.sandbox.spec import SYSTEM_PATH, SandboxError, Spec
from runtime.host.sandbox.terminal import Relay, host_terminals

STAGE_PARENT = Path(os.environ.get("SECURE_PROXY_SANDBOX_STAGE", "/tmp"))
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _inner_pid(outer: int) -> int | None:
    try:
        kids = Path(f"/proc/{outer}/task/{outer}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def preflight() -> None:
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:
        raise SandboxError("the sandbox engine needs Linux (namespaces); use --engine docker")
    if geteuid() != 0:
        raise SandboxError(
            "the sandbox engine needs root (it creates namespaces); run as root, or use "
            "--engine docker / --engine podman"
        )
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if not shutil.which(tool):
            raise SandboxError(f"the sandbox engine needs `{tool}` (util-linux / iproute2)")


def check_venv(venv: Path) -> None:
    """The sandbox reuses the interpreter and packages copilot_here runs from: a venv."""
    if not (venv / "pyvenv.cfg").is_file() or not (venv / "bin" / "python").exists():
        raise SandboxError(
            f"the sandbox engine reuses the Python environment copilot_here runs from, and "
            f"{venv} is not a virtual environment. Fix: install copilot_here into one "
            "(python3 -m venv DIR && DIR/bin/pip install ...) and run DIR/bin/copilot_here"
        )


def run(spec: Spec, by_name: Mapping[str, str] | None = None) -> int:
    """Run the sandbox to completion; the return value is the command's exit code.
    `by_name`: the values of spec.env_by_name (the sign-in token), passed to PID 1 in
    its environment, as `docker run -e NAME` passes them."""
    preflight()
    check_venv(Path(spec.reuse_venv))
    cleanup_leftovers()
    spec.run_id = spec.run_id or secrets.token_hex(3)
    net = Network(spec.run_id, spec.netns)
    stage = STAGE_PARENT / f"sp-sandbox-{spec.run_id}"
    stage.mkdir(mode=0o700)
    spec.stage = str(stage)
    REGISTRY.mkdir(parents=True, exist_ok=True)
    reg = REGISTRY / f"{spec.run_id}.json"
    me = os.getpid()
    record: dict[str, object] = {
        "pid": me,
        "starttime": starttime(me),
        "ns": net.ns,
        "stage": str(stage),
    }
    reg.write_text(json.dumps(record))
    proc: subprocess.Popen[bytes] | None = None
    relay: Relay | None = None
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        net.create()
        record["undo"] = net.nat_rules
        reg.write_text(json.dumps(record))
        python = str(Path(spec.reuse_venv) / "bin" / "python")
        env = {
            "PATH": SYSTEM_PATH,
            "PYTHONPATH": spec.source,
            "SP_SANDBOX_SPEC": spec.to_json(),
        }
        env.update({k: v for k, v in (by_name or {}).items() if k in spec.env_by_name})
        argv = [
            *("nsenter", f"--net=/run/netns/{net.ns}", "--"),
            *("unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--kill-child"),
            *("--propagation", "private", "--"),
            *(python, "-m", "runtime.host.sandbox", "--inner"),
        ]

        def forward(signum: int, _frame: object) -> None:
            # The sandbox has a terminal of its own (a host terminal's Ctrl-C reaches
            # it as a byte, through the relay): every signal is passed on to init.
            if proc is not None:
                inner = _inner_pid(proc.pid)
                if inner:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(inner, signum)

        for sig in SIGNALS:
            signal.signal(sig, forward)
        # Never the host's terminal: a pseudo-terminal of the sandbox's own
        # (runtime.host.sandbox.terminal says why).
        terminals = host_terminals()
        relay = Relay(terminals) if terminals else None
        if relay is None:
            proc = subprocess.Popen(argv, env=env, start_new_session=True)
        else:
            proc = subprocess.Popen(argv, env=env, preexec_fn=relay.session_leader, **relay.stdio())
            relay.start()
        code = proc.wait()
        return 128 - code if code < 0 else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if relay is not None:
            relay.close()
        net.close()
        with contextlib.suppress(OSError):
            stage.rmdir()
        reg.unlink(missing_ok=True)
