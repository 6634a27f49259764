"""`copilot_here [run flags] [-- COMMAND...]`: run the agent container.

One plan (runtime.host.plan: what to mount where, which environment) and three engines:

    docker / podman   argv for `docker run` / `podman run` (runtime.host.engines; waited
                      for: the exit code is the container's, SIGTERM/SIGHUP are passed
                      on, a terminal's Ctrl-C reaches the command: runtime.host.writable)
    sandbox           the same init as PID 1 in Linux namespaces (runtime.host.sandbox)

Every run is waited for so that the CLI can report at exit: what the agent changed
in a writable config (runtime.host.writable), and what was blocked or flagged
(runtime.host.afterrun).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from runtime.core.config import ConfigError
from runtime.core.github import repository_of
from runtime.core.policy import Mode
from runtime.host import afterrun, copilotstate, github, hoststate, signin, trust
from runtime.host.engines import (
    default_engine,
    engine_argv,
    free_name,
    podman_rootless,
    refuse_engine_args,
)
from runtime.host.fileproblems import FileProblem
from runtime.host.plan import (
    CONTAINER_LOGS,
    Plan,
    RunError,
    plan,
    prepare_airlock_copy,
    prepare_config_mountpoint,
    prepare_logs,
)
from runtime.host.writable import report_config_changes, wait_for, watch_writable_config
from runtime.resolve import GITHUB_REPO_ENV, resolve

DEFAULT_IMAGE = os.environ.get("COPILOT_HERE_IMAGE", "copilot_here-secure:latest")
ENGINES = ("docker", "podman", "sandbox")


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
    pull = group.add_mutually_exclusive_group()
    pull.add_argument(
        "--pull",
        dest="pull",
        action="store_const",
        const="always",
        help="docker/podman: pull the image before the run (default: only when missing)",
    )
    pull.add_argument(
        "--no-pull",
        dest="pull",
        action="store_const",
        const="never",
        help="docker/podman: never pull; a missing image is an error",
    )
    group.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... to run")


def sandbox_spec(p: Plan, netns: str | None):  # -> runtime.host.sandbox.Spec
    from runtime.host import sandbox

    return sandbox.Spec(
        command=p.command,
        mounts=[sandbox.Mount(m.source, m.target, m.read_only) for m in p.mounts],
        env=p.env,
        add_hosts=p.add_hosts,
        netns=netns,
        cap_drop=[c.upper().removeprefix("CAP_") for c in p.cap_drop],
        env_by_name=list(p.env_by_name),
    )


def guard_active(project: Path, home: Path, config_write: bool) -> bool:
    """Whether the guard starts in this run (so the container needs NET_ADMIN): the
    config in force is enabled or logs, or it is mounted writable (it may be switched
    on during the run). The same resolution as the init's; ConfigError if broken."""
    resolved = resolve(project, home)
    policy = resolved.policy
    if policy.mode is not Mode.ALLOW_ALL or policy.log_to_file:
        return True
    return config_write and resolved.path is not None


def repository_gate(
    state: Path, project: Path, home: Path, interactive: bool, dry_run: bool
) -> dict[str, str] | None:
    """{{GITHUB_OWNER}}/{{GITHUB_REPO}} for this run from the project's origin, as approved
    (runtime.host.github); None when a changed origin keeps the run from starting."""
    relevant = bool(resolve(project, home).templated)
    return github.gate(state, project, relevant, interactive, record=not dry_run)


def run_from_args(args: argparse.Namespace, project: Path, home: Path) -> int:
    state = hoststate.state_root(home)
    project = project.resolve()
    try:
        # Before anything else (the plan, the engine probe, a dry run): a repo
        # config decides nothing until the user approved its exact content.
        interactive = not args.dry_run and sys.stdin.isatty() and sys.stderr.isatty()
        if not trust.gate(state, project, home, interactive):
            return 1
        values = repository_gate(state, project, home, interactive, args.dry_run)
        if values is None:
            return 1
        refuse_engine_args(args.engine_arg)
        engine = args.engine or default_engine(args.image)
        if args.sandbox_netns and engine != "sandbox":
            raise RunError("--sandbox-netns goes with --engine sandbox")
        if args.pull and engine == "sandbox":
            raise RunError("--pull/--no-pull go with --engine docker or podman")
        empty = state / trust.EMPTY if args.dry_run else trust.empty_dir(state)
        p = plan(
            project,
            home,
            args.network_config_write,
            args.logs_dir,
            args.add_host,
            list(args.command or []),
            empty_dir=empty,
            active=guard_active(project, home, args.network_config_write),
        )
        p.cap_drop = list(args.cap_drop)
        repository = repository_of(values)
        if repository:
            p.env[GITHUB_REPO_ENV] = repository
        copilot_dir = copilotstate.attach(p, home, os.environ)
        sign = signin.find(os.environ, interactive)
        p.env.update(sign.container_env())
        p.env_by_name = sign.names()
        if engine == "sandbox":
            return run_sandbox(args, p, state, project, home, sign, copilot_dir)
        argv = engine_argv(
            engine,
            args.image,
            p,
            args.engine_arg,
            rootless=engine == "podman" and podman_rootless(),
            name=free_name(engine, p.project),
            pull=args.pull or "missing",
        )
        if args.dry_run:
            signin.announce(sign, project, home)
            print(shlex.join(argv))
            return 0
        prepare_config_mountpoint(project)
        prepare_logs(p, args.logs_dir is not None, home)
        prepare_airlock_copy(p, home)
        copilotstate.prepare(copilot_dir, p)
        if not shutil.which(engine):
            raise RunError(f"{engine} is not installed; try --engine sandbox (as root)")
        watched = watch_writable_config(state, project, home, args.network_config_write)
        log_mark = afterrun.mark(logs_dir(p)) if p.active else None
        signin.announce(sign, project, home)
        sys.stdout.flush()
        sys.stderr.flush()
        # The token by name: its value is in the engine's environment, not its argv.
        os.environ.update(sign.values())
        try:
            return wait_for(argv)
        finally:
            report_config_changes(state, watched)
            afterrun.report(log_mark, args.logs_dir)
    except RunError as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        head = "" if len(exc.problems) == 1 else "invalid network config\n"
        print(f"copilot_here: {head}{exc}", file=sys.stderr)
        return 1
    except (trust.TrustError, hoststate.StateError, FileProblem, signin.SignInError) as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return 1


def run_sandbox(
    args: argparse.Namespace,
    p: Plan,
    state: Path,
    project: Path,
    home: Path,
    sign: signin.SignIn,
    copilot_dir: Path,
) -> int:
    from runtime.host import sandbox

    spec = sandbox_spec(p, args.sandbox_netns)
    if args.dry_run:
        signin.announce(sign, project, home)
        print(f"sandbox {spec.to_json()}")
        return 0
    prepare_config_mountpoint(project)
    prepare_logs(p, args.logs_dir is not None, home)
    prepare_airlock_copy(p, home)
    copilotstate.prepare(copilot_dir, p)
    watched = watch_writable_config(state, project, home, args.network_config_write)
    log_mark = afterrun.mark(logs_dir(p)) if p.active else None
    signin.announce(sign, project, home)
    try:
        return sandbox.run(spec, sign.values())
    except sandbox.SandboxError as exc:
        raise RunError(str(exc)) from None
    finally:
        report_config_changes(state, watched)
        afterrun.report(log_mark, args.logs_dir)


def logs_dir(p: Plan) -> Path:
    return Path(next(m.source for m in p.mounts if m.target == CONTAINER_LOGS))
