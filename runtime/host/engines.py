"""The docker / podman side of a run: the `run` argv for a plan, which engine
answers on this host, and the engine arguments that are refused.

    docker|podman run --rm -i[t] --name copilot_here-<project key> --label ...
        --pull=missing|always|never  [--cap-add=NET_ADMIN (+NET_RAW on podman), active only]
        [--userns=keep-id --user=0:0, rootless podman only]
        -e ...  --mount type=bind,src=...,dst=...[,readonly]  --add-host ...
        [--engine-arg ...]  IMAGE  COMMAND...
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from runtime.host.hoststate import path_key
from runtime.host.plan import Mount, Plan, RunError

PULL_POLICIES = ("missing", "always", "never")
LABEL_PREFIX = "copilot_here"
DISTRIBUTION = "copilot-here-secure-proxy"


def csv_field(text: str) -> str:
    """One field of `--mount`'s comma-separated value, quoted as Docker and Podman read
    it (Go's encoding/csv): a path with `,` or `"` is wrapped in quotes, `"` doubled."""
    if any(c in text for c in ',"\r\n') or text[:1].isspace():
        return '"' + text.replace('"', '""') + '"'
    return text


def mount_arg(m: Mount) -> str:
    """`--mount` rather than `-v`: a path with `:` (or `,`, quoted) stays one path, and
    a missing source is an error instead of a root-owned directory the engine makes."""
    fields = ["type=bind", csv_field(f"src={m.source}"), csv_field(f"dst={m.target}")]
    if m.read_only:
        fields.append("readonly")
    return "--mount=" + ",".join(fields)


def container_name(project: str) -> str:
    """Derived from the project: readable, and unique per project path (its hash)."""
    return f"{LABEL_PREFIX}-{path_key(Path(project))}"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def labels(project: str) -> dict[str, str]:
    return {
        f"{LABEL_PREFIX}.started-by": f"copilot_here {version()} (secure proxy host CLI)",
        f"{LABEL_PREFIX}.project": project,
    }


def _names_itself(extra: Sequence[str]) -> bool:
    return any(a == "--name" or a.startswith("--name=") for a in extra)


def engine_argv(
    engine: str,
    image: str,
    p: Plan,
    extra: Sequence[str] | None = None,
    *,
    rootless: bool = False,
    name: str | None = None,
    pull: str = "missing",
) -> list[str]:
    extra = list(extra or [])
    argv = [engine, "run", "--rm", "-it" if p.tty else "-i"]
    if p.project and not _names_itself(extra):
        argv.append(f"--name={name or container_name(p.project)}")
    if p.project:
        argv += [f"--label={key}={value}" for key, value in labels(p.project).items()]
    argv.append(f"--pull={pull}")
    # The firewall needs NET_ADMIN (and NET_RAW, which Docker grants by default and
    # Podman does not) only when something starts it: an active config, or one
    # mounted writable (it may be switched on during the run). Else none.
    adds = ["NET_ADMIN", "NET_RAW"] if engine == "podman" else ["NET_ADMIN"]
    dropped = {c.upper().removeprefix("CAP_") for c in p.cap_drop}
    if p.active:
        argv += [f"--cap-add={cap}" for cap in adds if cap not in dropped]
    argv += [f"--cap-drop={cap}" for cap in sorted(dropped)]
    if engine == "podman" and rootless:
        # Rootless: the host user is the same uid inside (PUID), so the project's
        # files stay the user's; init itself must still start as root in the container
        # (keep-id alone would start it as the user). Rootful Podman rejects keep-id.
        argv += ["--userns=keep-id", "--user=0:0"]
    for key, value in p.env.items():
        argv += ["-e", f"{key}={value}"]
    for key in p.env_by_name:  # the value comes from the engine's environment
        argv += ["-e", key]
    argv += [mount_arg(m) for m in p.mounts]
    for host, ip in p.add_hosts:
        argv += ["--add-host", f"{host}:{ip}"]
    argv += extra
    argv.append(image)
    return argv + p.command


# ----------------------------------------------------------------------------- refused arguments

HOST_NAMESPACES = {
    "--network": "network",
    "--net": "network",
    "--pid": "PID",
    "--userns": "user",
}


def refuse_engine_args(extra: Sequence[str]) -> None:
    """Engine arguments that would defeat or misdirect the guard: RunError (exit 2).

    Sharing the host's network namespace puts the firewall on the host's network and
    the agent's traffic beside it; the host's PID or user namespace, --privileged or
    every capability let the agent undo the lock; another entrypoint skips the init.
    Both spellings are read: `--net=host` and `--net host` (two --engine-arg)."""
    args = list(extra)
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args) and name in (*HOST_NAMESPACES, "--cap-add"):
            value = args[i + 1]
        shown = f"--engine-arg={arg}" + (f" --engine-arg={value}" if not eq and value else "")
        if name in HOST_NAMESPACES and value.strip().lower() == "host":
            what = HOST_NAMESPACES[name]
            raise RunError(
                f"{shown}: refused: the container would share the host's {what} namespace "
                "and the agent could get around the guard. Fix: drop it (to attach the "
                "container to a prepared network namespace use --engine-arg=--network=ns:PATH)"
            )
        if name == "--privileged" and value.strip().lower() not in ("false", "0"):
            raise RunError(
                f"{shown}: refused: a privileged container can undo the firewall. Fix: drop "
                "it; the CLI adds the one capability the guard needs"
            )
        if name == "--cap-add" and any(
            c.strip().upper().removeprefix("CAP_") == "ALL" for c in value.split(",")
        ):
            raise RunError(
                f"{shown}: refused: every capability lets the agent undo the firewall. Fix: "
                "add only the capabilities your tools need, by name"
            )
        if name == "--entrypoint":
            raise RunError(
                f"{shown}: refused: the guard's init is the entrypoint; another one would "
                "run the agent unguarded. Fix: pass the command after -- instead"
            )


# ----------------------------------------------------------------------------- probes


def _probe(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    if not shutil.which(argv[0]):
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def docker_answers() -> bool:
    probe = _probe(["docker", "info"], 5)
    return probe is not None and probe.returncode == 0


def podman_has(image: str) -> bool:
    probe = _probe(["podman", "image", "exists", image], 20)
    return probe is not None and probe.returncode == 0


def podman_rootless() -> bool:
    """Whether podman runs rootless here (then --userns=keep-id; rootful rejects it)."""
    probe = _probe(["podman", "info", "--format", "{{.Host.Security.Rootless}}"], 20)
    return probe is not None and probe.returncode == 0 and probe.stdout.strip() == "true"


def name_in_use(engine: str, name: str) -> bool:
    argv = (
        ["podman", "container", "exists", name]
        if engine == "podman"
        else ["docker", "container", "inspect", "--format", "{{.Id}}", name]
    )
    probe = _probe(argv, 10)
    return probe is not None and probe.returncode == 0


def free_name(engine: str, project: str) -> str:
    """The project's container name, numbered when a run of the same project still has it."""
    base = container_name(project)
    for n in range(1, 100):
        candidate = base if n == 1 else f"{base}-{n}"
        if not name_in_use(engine, candidate):
            return candidate
    return base  # the engine will say it is taken


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
