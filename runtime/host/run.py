"""`copilot_here [run flags] [-- COMMAND...]`: run the agent container.

One plan (what to mount where, which environment) and three engines:

    docker / podman   argv for `docker run` / `podman run` (exec'd: the exit code
                      and signals are the engine's own, which are the container's)
    sandbox           the same init as PID 1 in Linux namespaces (runtime.host.sandbox)

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

A run that mounts a config writable is waited for instead of exec'd: at exit the
CLI shows what the agent changed in it (a later run uses that only once approved).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from runtime import paths
from runtime.host import hostlogs, hoststate, trust
from runtime.resolve import GLOBAL, REPO, find_config

DEFAULT_IMAGE = os.environ.get("COPILOT_HERE_IMAGE", "copilot_here-secure:latest")
ENGINES = ("docker", "podman", "sandbox")
CONTAINER_CONFIG_REPO = "/work/.copilot_here"
CONTAINER_CONFIG_GLOBAL = str(paths.CONTAINER_HOME / ".copilot_here")
CONTAINER_LOGS = "/logs"


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    def docker(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


@dataclass
class Plan:
    mounts: list[Mount]
    env: dict[str, str]
    add_hosts: list[tuple[str, str]]
    command: list[str]
    tty: bool
    extra_args: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)


class RunError(Exception):
    pass


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running the container")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        help="container engine (default: docker if its daemon answers, "
        "else podman if it has the image, else sandbox)",
    )
    group.add_argument("--image", default=DEFAULT_IMAGE, help=f"image (default {DEFAULT_IMAGE})")
    group.add_argument(
        "--add-host",
        action="append",
        default=[],
        metavar="NAME:IP",
        help="add a line to the container's /etc/hosts (repeatable)",
    )
    group.add_argument(
        "--logs-dir",
        type=Path,
        help="host directory mounted at /logs, yours and without symlinks (default: "
        "$XDG_STATE_HOME/copilot_here/logs/<project>, i.e. ~/.local/state/...)",
    )
    group.add_argument("--dry-run", action="store_true", help="print the exact argv, run nothing")
    group.add_argument(
        "--sandbox-netns",
        metavar="NAME",
        help="sandbox engine: uplink to this network namespace instead of the host (NAT)",
    )
    group.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `docker run` / `podman run` (repeatable)",
    )
    group.add_argument(
        "--cap-drop",
        action="append",
        default=[],
        metavar="CAP",
        help="drop a capability from the container (as docker run --cap-drop; e.g. NET_ADMIN "
        "to see the firewall fail closed)",
    )
    group.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... to run")


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
) -> Plan:
    environ = dict(os.environ if environ is None else environ)
    project = project.resolve()
    mounts = [Mount(str(project), str(paths.container_project_dir()))]
    mounts += config_mounts(project, home, config_write, environ, empty_dir)
    logs = hostlogs.logs_source(project, home, logs_dir, environ)
    mounts.append(Mount(str(logs), CONTAINER_LOGS))
    env = {
        "PUID": str(os.getuid() if uid is None else uid),
        "PGID": str(os.getgid() if gid is None else gid),
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
    return Plan(mounts, env, [parse_add_host(h) for h in add_hosts], list(command), tty)


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
    if kind == GLOBAL and path is not None:
        mounts.append(Mount(str(path.parent.resolve()), CONTAINER_CONFIG_GLOBAL, not config_write))
    return mounts


def prepare_config_mountpoint(project: Path) -> None:
    """Make the mountpoint of /work/.copilot_here as the user, before the engine does
    it as root (Docker would leave a root-owned directory in the project, in which
    the user could not create a config later). A symlink is refused: the engine
    would resolve it inside the container and mount somewhere else."""
    mountpoint = project / paths.REPO_CONFIG_RELATIVE.parent
    if mountpoint.is_symlink():
        raise RunError(
            f"{mountpoint} is a symlink; a container resolves it inside itself. Fix: make it "
            "a real directory in the project (or remove it)"
        )
    if not os.path.lexists(mountpoint):
        mountpoint.mkdir(mode=0o755)
    elif not mountpoint.is_dir():
        raise RunError(f"{mountpoint} is not a directory; move it away")


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


def sandbox_spec(p: Plan, netns: str | None):  # -> runtime.host.sandbox.Spec
    from runtime.host import sandbox

    return sandbox.Spec(
        command=p.command,
        mounts=[sandbox.Mount(m.source, m.target, m.read_only) for m in p.mounts],
        env=p.env,
        add_hosts=p.add_hosts,
        netns=netns,
        cap_drop=[c.upper().removeprefix("CAP_") for c in p.cap_drop],
    )


def run_from_args(args: argparse.Namespace, project: Path, home: Path) -> int:
    state = hoststate.state_root(home)
    project = project.resolve()
    try:
        # Before anything else (the plan, the engine probe, a dry run): a repo
        # config decides nothing until the user approved its exact content.
        interactive = not args.dry_run and sys.stdin.isatty() and sys.stderr.isatty()
        if not trust.gate(state, project, home, interactive):
            return 1
        engine = args.engine or default_engine(args.image)
        empty = state / trust.EMPTY if args.dry_run else trust.empty_dir(state)
        p = plan(
            project,
            home,
            args.network_config_write,
            args.logs_dir,
            args.add_host,
            list(args.command or []),
            empty_dir=empty,
        )
        p.cap_drop = list(args.cap_drop)
        if args.sandbox_netns and engine != "sandbox":
            raise RunError("--sandbox-netns goes with --engine sandbox")
        if engine == "sandbox":
            from runtime.host import sandbox

            spec = sandbox_spec(p, args.sandbox_netns)
            if args.dry_run:
                print(f"sandbox {spec.to_json()}")
                return 0
            prepare_config_mountpoint(project)
            _prepare_logs(p, args.logs_dir is not None, home)
            watched = watch_writable_config(state, project, home, args.network_config_write)
            try:
                return sandbox.run(spec)
            except sandbox.SandboxError as exc:
                raise RunError(str(exc)) from None
            finally:
                report_config_changes(state, watched)
        argv = engine_argv(engine, args.image, p, args.engine_arg)
        if args.dry_run:
            print(shlex.join(argv))
            return 0
        prepare_config_mountpoint(project)
        _prepare_logs(p, args.logs_dir is not None, home)
        if not shutil.which(engine):
            raise RunError(f"{engine} is not installed; try --engine sandbox (as root)")
        watched = watch_writable_config(state, project, home, args.network_config_write)
        sys.stdout.flush()
        sys.stderr.flush()
        if watched is None:
            os.execvp(engine, argv)
        try:
            return wait_for(argv)
        finally:
            report_config_changes(state, watched)
    except RunError as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return 2
    except (trust.TrustError, hoststate.StateError) as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return 1


def watch_writable_config(
    state: Path, project: Path, home: Path, config_write: bool
) -> tuple[str, Path] | None:
    """The config a writable run exposes to the agent, its content recorded as the
    approved one (if not yet), so what the agent changes is shown at exit and needs
    approval before a later run uses it. None when nothing is mounted writable."""
    if not config_write:
        return None
    kind, path = find_config(project, home)
    if path is None:
        return None
    trust.before_writable_run(state, kind, path)
    return kind, path


def report_config_changes(state: Path, watched: tuple[str, Path] | None) -> None:
    if watched is not None:
        print(trust.after_writable_run(state, *watched), end="", file=sys.stderr)


FORWARDED = (signal.SIGTERM, signal.SIGHUP)
TERMINAL = (signal.SIGINT, signal.SIGQUIT)


def wait_for(argv: list[str]) -> int:
    """Run the engine as a child and return its exit code (128+N for signal N), as
    exec would have: SIGTERM/SIGHUP are passed on; SIGINT/SIGQUIT come from the
    terminal, which sends them to the engine too (or, in raw mode, the engine reads
    the keys), so the CLI only survives them to report at exit."""
    child: list[subprocess.Popen[bytes]] = []
    early: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            early.append(signum)

    def survive(_signum: int, _frame: object) -> None:
        # A handler, not SIG_IGN: an ignored signal stays ignored across exec, and
        # the engine must still get the user's Ctrl-C.
        return

    previous = {sig: signal.getsignal(sig) for sig in (*FORWARDED, *TERMINAL)}
    try:
        for sig in FORWARDED:
            signal.signal(sig, forward)
        for sig in TERMINAL:
            signal.signal(sig, survive)
        try:
            proc = subprocess.Popen(argv)
        except OSError as exc:
            raise RunError(f"cannot start {argv[0]}: {exc.strerror}") from None
        child.append(proc)
        for sig in early:
            proc.send_signal(sig)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def _logs_source(p: Plan) -> str:
    return next(m.source for m in p.mounts if m.target == CONTAINER_LOGS)


def _prepare_logs(p: Plan, explicit: bool, home: Path) -> None:
    """Create and check the host logs directory (runtime.host.hostlogs); StateError if unsafe."""
    others = [(m.source, m.target) for m in p.mounts if m.target != CONTAINER_LOGS]
    hostlogs.prepare(Path(_logs_source(p)), explicit, home, others)
