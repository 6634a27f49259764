"""`copilot_here`: the host CLI.

Network configuration commands (init, show, enable/disable, check: runtime.host.netcmds)
work on the same files and through the same core the container uses; anything else
runs the container (runtime.host.run). Exit codes: 0 success, 1 config error,
2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from runtime.core.config import ConfigError
from runtime.host import hoststate, run, trust
from runtime.host.netcmds import (
    EXIT_CONFIG,
    EXIT_USAGE,
    UsageError,
    cmd_check,
    cmd_init,
    cmd_set_enabled,
    cmd_show,
    cmd_trust,
)
from runtime.resolve import find_config, global_config_path, repo_config_path

# ---------------------------------------------------------------------------
# Argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copilot_here",
        description="Run coding agents in a container whose outbound network is guarded.",
    )
    net = parser.add_argument_group("network configuration")
    actions = net.add_mutually_exclusive_group()
    actions.add_argument(
        "--network-init",
        action="store_true",
        help="create .copilot_here/network.json in this project",
    )
    actions.add_argument(
        "--network-init-global", action="store_true", help="create ~/.copilot_here/network.json"
    )
    actions.add_argument(
        "--network-show",
        action="store_true",
        help="show the effective config, its source and rules",
    )
    actions.add_argument(
        "--network-enable",
        action="store_true",
        help="enable rules in the config in use (repo, else global, else new repo)",
    )
    actions.add_argument(
        "--network-disable", action="store_true", help="disable rules in the config in use"
    )
    actions.add_argument(
        "--network-enable-global", action="store_true", help="enable rules in the global config"
    )
    actions.add_argument(
        "--network-disable-global", action="store_true", help="disable rules in the global config"
    )
    actions.add_argument(
        "--network-trust",
        action="store_true",
        help="show the repo (or global) config's changes since its last approval, then approve it",
    )
    actions.add_argument(
        "--network-check",
        metavar="URL",
        help="explain how the effective policy treats a request to URL",
    )
    net.add_argument("--method", default="GET", help="HTTP method for --network-check")
    net.add_argument(
        "--no-inherit",
        action="store_true",
        help="with --network-init*: do not inherit built-in defaults",
    )
    net.add_argument(
        "--force", action="store_true", help="with --network-init*: replace an existing config"
    )
    net.add_argument(
        "--network-config-write",
        action="store_true",
        help="mount the network config writable in the container (live edits)",
    )
    run.add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    project = Path.cwd()
    home = Path(os.environ.get("HOME") or Path.home())
    state = hoststate.state_root(home)
    out = sys.stdout
    try:
        if (args.no_inherit or args.force) and not (args.network_init or args.network_init_global):
            raise UsageError(
                "--no-inherit and --force go with --network-init or --network-init-global"
            )
        if args.network_init:
            target = repo_config_path(project)
            return cmd_init(target, args.no_inherit, args.force, state, home, out)
        if args.network_init_global:
            target = global_config_path(home)
            return cmd_init(target, args.no_inherit, args.force, state, home, out)
        if args.network_show:
            return cmd_show(project, home, args.network_config_write, state, out, args.logs_dir)
        if args.network_trust:
            return cmd_trust(project, home, state, out)
        if args.network_enable or args.network_disable:
            _, path = find_config(project, home)
            target = path if path is not None else repo_config_path(project)
            return cmd_set_enabled(target, args.network_enable, state, home, out)
        if args.network_enable_global or args.network_disable_global:
            target = global_config_path(home)
            return cmd_set_enabled(target, args.network_enable_global, state, home, out)
        if args.network_check:
            return cmd_check(project, home, args.network_check, args.method, out)
        return run.run_from_args(args, project, home)
    except UsageError as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"copilot_here: invalid network config\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (trust.TrustError, hoststate.StateError) as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
