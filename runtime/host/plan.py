"""What a run mounts where and with which environment: one plan for every engine.

Mounts: the project at /work; the repo config *directory* at /work/.copilot_here,
else the global config directory at /home/appuser/.copilot_here (read-only
unless --network-config-write; a directory, never the file: a single-file bind
mount shows no inotify events and an editor that saves by rename leaves the
container on the old inode); a host logs directory at /logs; the upstream CA
named by SECURE_PROXY_UPSTREAM_CA.

/work/.copilot_here is never writable unless --network-config-write asked for
it and the repo config is the one in use: without a repo config an empty
read-only directory of the host state is mounted there, so nothing can be
planted for the in-container init or reloader, nor for the next run (which
would in any case refuse an unapproved repo config: runtime.host.trust).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime import fsutil, paths
from runtime.host import hostlogs, hoststate, trust
from runtime.host.fileproblems import FileProblem, problem
from runtime.resolve import AIRLOCK_GLOBAL, GLOBAL, REPO, find_config, read_config

CONTAINER_CONFIG_REPO = "/work/.copilot_here"
CONTAINER_CONFIG_GLOBAL = str(paths.CONTAINER_HOME / ".copilot_here")
CONTAINER_LOGS = "/logs"
#: Where the native translation of copilot_here's global Airlock config is kept for a run.
AIRLOCK_COPY = "airlock-global"


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass
class Plan:
    mounts: list[Mount]
    env: dict[str, str]
    add_hosts: list[tuple[str, str]]
    command: list[str]
    tty: bool
    extra_args: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    project: str = ""  # the host path mounted at /work (names and labels the container)
    active: bool = True  # the guard starts (a config in force, or mounted writable)
    # Passed by name only (`-e NAME`): the values (the sign-in token) stay out of every
    # argv and dry run; they go in the engine's environment (runtime.host.signin).
    env_by_name: list[str] = field(default_factory=list)


class RunError(Exception):
    pass


def parse_add_host(value: str) -> tuple[str, str]:
    name, sep, ip = value.partition(":")
    if not sep or not name or not ip:
        raise RunError(f"--add-host wants NAME:IP, not {value!r}")
    return name, ip


def plan(
    project: Path,
    home: Path,
    config_write: bool,
    logs_dir: Path | None,
    add_hosts: list[str],
    command: list[str],
    environ: dict[str, str] | None = None,
    tty: bool | None = None,
    uid: int | None = None,
    gid: int | None = None,
    empty_dir: Path | None = None,
    active: bool = True,
) -> Plan:
    environ = dict(os.environ if environ is None else environ)
    project = project.resolve()
    mounts = [Mount(str(project), str(paths.container_project_dir()))]
    mounts += config_mounts(project, home, config_write, environ, empty_dir)
    logs = hostlogs.logs_source(project, home, logs_dir, environ)
    mounts.append(Mount(str(logs), CONTAINER_LOGS))
    if uid is None or gid is None:
        uid, gid = hoststate.user_ids()
    env = {
        "PUID": str(uid),
        "PGID": str(gid),
        "SECURE_PROXY_HOST_LOG_DIR": str(logs),  # for the init's banner only
    }
    if environ.get("SECURE_PROXY_TRACE"):
        env["SECURE_PROXY_TRACE"] = environ["SECURE_PROXY_TRACE"]
    upstream = environ.get("SECURE_PROXY_UPSTREAM_CA")
    if upstream:
        ca = Path(upstream).resolve()
        if not ca.is_file():
            raise RunError(f"SECURE_PROXY_UPSTREAM_CA={upstream}: no such file on this host")
        mounts.append(Mount(str(ca), str(paths.CONTAINER_UPSTREAM_CA), True))
        env["SECURE_PROXY_UPSTREAM_CA"] = str(paths.CONTAINER_UPSTREAM_CA)
    if command[:1] == ["--"]:
        command = command[1:]
    tty = os.isatty(0) if tty is None else tty
    if tty and environ.get("TERM"):
        env["TERM"] = environ["TERM"]
    hosts = [parse_add_host(h) for h in add_hosts]
    return Plan(mounts, env, hosts, list(command), tty, project=str(project), active=active)


def config_mounts(
    project: Path,
    home: Path,
    config_write: bool,
    environ: dict[str, str],
    empty_dir: Path | None = None,
) -> list[Mount]:
    """The config mounts. /work/.copilot_here always gets one (a bind mount over a
    directory of the /work bind mount): the repo config's directory, or an empty
    read-only directory that hides the project's own (writable even with
    --network-config-write only when it holds the repo config in use)."""
    kind, path = find_config(project, home)
    if kind == REPO and path is not None:
        return [Mount(str(path.parent), CONTAINER_CONFIG_REPO, not config_write)]
    empty = empty_dir or hoststate.state_root(home, environ) / trust.EMPTY
    mounts = [Mount(str(empty), CONTAINER_CONFIG_REPO, True)]
    if kind == AIRLOCK_GLOBAL and path is not None:
        mounts.append(airlock_global_mount(path, home, config_write, environ))
    if kind == GLOBAL and path is not None:
        mounts.append(
            Mount(str(global_mount_source(path)), CONTAINER_CONFIG_GLOBAL, not config_write)
        )
    return mounts


def airlock_global_mount(
    path: Path, home: Path, config_write: bool, environ: dict[str, str]
) -> Mount:
    """copilot_here's global Airlock config is never mounted itself (its directory holds
    copilot_here's other files): its native translation is, read-only, as the global
    config (prepare_airlock_copy writes it), so the container reads what the host did."""
    if config_write:
        raise RunError(
            f"--network-config-write: the config in use is copilot_here's Airlock config "
            f"{path}, which a run never mounts writable. Fix: copilot_here --network-migrate "
            "(it writes the native global config), then run again"
        )
    copy = hoststate.state_root(home, environ) / AIRLOCK_COPY
    return Mount(str(copy), CONTAINER_CONFIG_GLOBAL, True)


def prepare_airlock_copy(p: Plan, home: Path) -> None:
    """Write the native translation of copilot_here's global Airlock config where the
    plan mounts it (state root, out of the agent's reach). Nothing when not in use."""
    mount = next((m for m in p.mounts if m.source.endswith("/" + AIRLOCK_COPY)), None)
    if mount is None:
        return
    kind, path = find_config(Path(p.project), home)
    if kind != AIRLOCK_GLOBAL or path is None:
        return
    config = read_config(path, airlock=True)
    copy = hoststate.ensure_private_dir(Path(mount.source), hoststate.state_root(home))
    os.chmod(copy, 0o755)  # the container's users read it
    text = json.dumps(config.native, indent=2, ensure_ascii=False) + "\n"
    fsutil.atomic_write(copy / paths.REPO_CONFIG_RELATIVE.name, text, 0o644)


def global_mount_source(path: Path) -> Path:
    """The directory mounted for the global config: the one holding the file itself,
    through any symlink (dotfiles). The container looks for network.json there, and
    sees everything in it: a linked file must be network.json, alone in its directory."""
    target = path.resolve()
    if not os.path.islink(path):
        return target.parent
    if target.name != paths.REPO_CONFIG_RELATIVE.name:
        raise FileProblem(
            f"{path} links to {target}; the container reads network.json from the linked "
            f"file's directory. Fix: name the file network.json (or link the directory "
            f"{path.parent} instead)"
        )
    others = sorted(e.name for e in os.scandir(target.parent) if e.name != target.name)
    if others:
        raise FileProblem(
            f"{path} links into {target.parent}, which the container would see whole "
            f"(also {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}). Fix: keep "
            "network.json in a directory of its own and link to it there"
        )
    return target.parent


def prepare_config_mountpoint(project: Path) -> None:
    """Make the mountpoint of /work/.copilot_here as the user, before the engine does
    it as root (Docker would leave a root-owned directory in the project, in which
    the user could not create a config later). A symlink is refused: the engine
    would resolve it inside the container and mount somewhere else."""
    mountpoint = project / paths.REPO_CONFIG_RELATIVE.parent
    if mountpoint.is_symlink():
        raise FileProblem(
            f"{mountpoint} is a symlink; a container resolves it inside itself. Fix: make it "
            "a real directory in the project (or remove it)"
        )
    if not os.path.lexists(mountpoint):
        try:
            mountpoint.mkdir(mode=0o755)
        except OSError as exc:
            raise problem(mountpoint, exc, "create") from None
    elif not mountpoint.is_dir():
        raise FileProblem(
            f"{mountpoint} is a file, but the config directory belongs there (it is the "
            f"mountpoint of /work/.copilot_here). Fix: move {mountpoint} away"
        )


def _logs_source(p: Plan) -> str:
    return next(m.source for m in p.mounts if m.target == CONTAINER_LOGS)


def prepare_logs(p: Plan, explicit: bool, home: Path) -> None:
    """Create and check the host logs directory (runtime.host.hostlogs); StateError if unsafe."""
    others = [(m.source, m.target) for m in p.mounts if m.target != CONTAINER_LOGS]
    hostlogs.prepare(Path(_logs_source(p)), explicit, home, others)
