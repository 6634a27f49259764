"""What runs inside the sandbox's namespaces: PID 1 builds the root (an overlay of
the host's /, fresh /proc /run /tmp /home, the bind mounts), lays the runtime with
runtime.install, pivots into it and becomes the init."""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import time
from pathlib import Path

from runtime import paths
from runtime.host.sandbox.spec import HOSTNAME, SYSTEM_PATH, SandboxError, Spec, run_tool

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
MNT_DETACH = 2


def _mount(*args: str) -> None:
    run_tool(["mount", *args])


def _bind(source: str, target: Path, read_only: bool) -> None:
    src = Path(source)
    if src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount("--bind", source, str(target))
    if read_only:
        _mount("-o", "remount,bind,ro", str(target))


def _pivot(new_root: Path) -> None:
    os.chdir(new_root)
    if _SYS_PIVOT_ROOT is not None and _libc.syscall(_SYS_PIVOT_ROOT, b".", b".") == 0:
        if _libc.umount2(b".", MNT_DETACH) != 0:
            raise SandboxError(f"umount old root: {os.strerror(ctypes.get_errno())}")
    else:
        os.chroot(".")
    os.chdir("/")


def _hosts(add_hosts: list[tuple[str, str]]) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"127.0.1.1\t{HOSTNAME}",
    ]
    lines += [f"{ip}\t{name}" for name, ip in add_hosts]
    return "\n".join(lines) + "\n"


def build_root(spec: Spec) -> Path:
    stage = Path(spec.stage)
    _mount("-t", "tmpfs", "-o", "mode=0755", "sp-sandbox", str(stage))
    for d in ("upper", "work", "root"):
        (stage / d).mkdir()
    new = stage / "root"
    _mount(
        "-t",
        "overlay",
        "sp-sandbox-root",
        "-o",
        f"lowerdir=/,upperdir={stage}/upper,workdir={stage}/work",
        str(new),
    )
    _mount("-t", "proc", "proc", str(new / "proc"))
    _mount("--rbind", "/dev", str(new / "dev"))
    try:
        _mount("-t", "sysfs", "-o", "ro", "sysfs", str(new / "sys"))
    except SandboxError:
        _mount("--rbind", "-o", "ro", "/sys", str(new / "sys"))
    for path, mode in (("tmp", "1777"), ("run", "0755"), ("home", "0755"), ("dev/shm", "1777")):
        (new / path).mkdir(exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"mode={mode}", "sp-sandbox", str(new / path))
    # The reused venv may live on a mount the overlay (root fs only) does not show.
    venv = Path(spec.reuse_venv)
    if venv.is_dir():
        _bind(str(venv), new / venv.relative_to("/"), read_only=True)
    for m in spec.mounts:
        _bind(m.source, new / m.target.lstrip("/"), m.read_only)
    (new / "etc" / "hosts").write_text(_hosts(spec.add_hosts))
    (new / "etc" / "hostname").write_text(HOSTNAME + "\n")
    return new


def inner() -> int:
    """PID 1 of the new pid namespace: build the root, install, become init."""
    started = time.monotonic()
    spec = Spec.from_json(os.environ.pop("SP_SANDBOX_SPEC"))
    by_name = {k: os.environ.pop(k) for k in spec.env_by_name if os.environ.get(k)}
    try:
        socket.sethostname(HOSTNAME)
        new = build_root(spec)
        from runtime.install import install

        install(new, Path(spec.source), reuse_venv=Path(spec.reuse_venv))
        _pivot(new)
        if spec.env.get("SECURE_PROXY_TRACE") == "1":
            elapsed = time.monotonic() - started
            print(
                f"[sandbox] run {spec.run_id}: root built and runtime installed in {elapsed:.2f}s",
                file=sys.stderr,
            )
    except Exception as exc:
        print(f"[Sandbox] setup failed: {exc}", file=sys.stderr, flush=True)
        return 1
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": "/root",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "container": "secure-proxy-sandbox",
        **spec.env,
        **by_name,
    }
    init = str(paths.venv_dir() / "bin" / "secure-proxy-init")
    argv = [init, "--", *spec.command]
    if spec.cap_drop:
        # As docker run --cap-drop: out of the bounding set, so init and every
        # component it starts run without them.
        drop = ",".join(f"-{c.lower()}" for c in spec.cap_drop)
        argv = ["setpriv", f"--bounding-set={drop}", "--", *argv]
        os.execvpe("setpriv", argv, env)
    os.execve(init, argv, env)
    return 127
