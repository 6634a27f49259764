"""`copilot_here [run flags] [-- COMMAND...]`: run the agent container.

One plan (runtime.host.plan: what to mount where, which environment) and three engines:

    docker / podman   argv for `docker run` / `podman run` (runtime.host.engines; exec'd:
                      the exit code and signals are the engine's own, the container's)
    sandbox           the same init as PID 1 in Linux namespaces (runtime.host.sandbox)

A run that mounts a config writable is waited for instead (runtime.host.writable).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from runtime.host import hoststate, trust
from runtime.host.engines import default_engine, engine_argv
from runtime.host.plan import Plan, RunError, plan, prepare_config_mountpoint, prepare_logs
from runtime.host.writable import report_config_changes, wait_for, watch_writable_config

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
            prepare_logs(p, args.logs_dir is not None, home)
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
        prepare_logs(p, args.logs_dir is not None, home)
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
