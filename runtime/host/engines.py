"""The docker / podman side of a run: the `run` argv for a plan, and which engine
answers on this host."""

from __future__ import annotations

import shutil
import subprocess

from runtime.host.plan import Plan


def engine_argv(engine: str, image: str, p: Plan, extra: list[str] | None = None) -> list[str]:
    argv = [engine, "run", "--rm", "-it" if p.tty else "-i"]
    adds = ["NET_ADMIN"]
    if engine == "podman":
        adds.append("NET_RAW")  # Docker grants NET_RAW by default, Podman does not
    dropped = {c.upper().removeprefix("CAP_") for c in p.cap_drop}
    argv += [f"--cap-add={cap}" for cap in adds if cap not in dropped]
    argv += [f"--cap-drop={cap}" for cap in sorted(dropped)]
    for key, value in p.env.items():
        argv += ["-e", f"{key}={value}"]
    for m in p.mounts:
        argv += ["-v", m.docker()]
    for name, ip in p.add_hosts:
        argv += ["--add-host", f"{name}:{ip}"]
    argv += list(extra or [])
    argv.append(image)
    return argv + p.command


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, timeout=5, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def podman_has(image: str) -> bool:
    if not shutil.which("podman"):
        return False
    try:
        probe = subprocess.run(
            ["podman", "image", "exists", image], capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def choose_engine(docker_ok: bool, podman_ok: bool) -> str:
    """Docker when its daemon answers, else Podman when it has the image, else the
    sandbox. Podman without the image would only fail to pull it (no registry
    here): the sandbox runs the same runtime from this checkout instead."""
    if docker_ok:
        return "docker"
    return "podman" if podman_ok else "sandbox"


def default_engine(image: str) -> str:
    docker_ok = docker_answers()
    return choose_engine(docker_ok, not docker_ok and podman_has(image))
