"""`copilot_here`: the host CLI.

Network configuration commands (init, show, enable/disable, check: runtime.host.netcmds;
the log, suggest, replay and editing commands: runtime.host.workflow) work on the same
files and through the same core the container uses; anything else runs the container
(runtime.host.run). Exit codes: 0 success, 1 a config or file problem (one line naming
the file and the fix), 2 usage error, 3 `--network-check`: blocked (or, in monitor
mode, would be), `--network-replay`: something would now be blocked; a run exits with
the container's code.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.core.config import ConfigError
from runtime.host import hoststate, run, trust, workflow
from runtime.host.fileproblems import FileProblem
from runtime.host.fileproblems import describe as describe_os_error
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
from runtime.host.project import ProjectError, check_project, find_project
from runtime.resolve import find_config, global_config_path, repo_config_path

# ---------------------------------------------------------------------------
# Argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copilot_here",
        description="Run coding agents in a container whose outbound network is guarded.",
        epilog="Exit codes: 0 success (--network-check: allowed), 1 config or file problem, "
        "2 usage error, 3 --network-check: blocked (or would be, in monitor mode), "
        "--network-replay: something would now be blocked; a run "
        "exits with the container's code.",
        allow_abbrev=False,  # --network-sh is an error, never --network-show
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
        help="explain how the effective policy treats a request to URL; ssh://host, "
        "git's user@host:path or tcp://host:port: whether a rule's ports open that port",
    )
    net.add_argument(
        "--method",
        action="append",
        help="HTTP method for --network-check (default GET), or for --network-allow "
        "(repeatable; default every method)",
    )
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
    workflow.add_arguments(net, actions)
    run.add_run_arguments(parser)
    return parser


# ---------------------------------------------------------------------------
# Options that are not options


def _options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Every option string -> whether it takes a value."""
    return {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}


def _optional_value(parser: argparse.ArgumentParser) -> set[str]:
    """The options whose value may be left out (--network-replay [LOG])."""
    return {o for a in parser._actions if a.nargs == "?" for o in a.option_strings}


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, [o for o in options if o.startswith("--")], 1, 0.6)
    return f"; did you mean {close[0]}?" if close else ""


def precheck(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Before argparse: an unknown option gets its did-you-mean, and a bare word that is
    a misspelt option (`network-show`) is not taken for the command to run (argparse
    would start a container running `network-show`). Stops where the command starts."""
    options = _options(parser)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return
        if arg.startswith("-") and arg != "-":
            name = arg.partition("=")[0]
            if name not in options:
                raise UsageError(
                    f"unknown option {name}{_did_you_mean(name, list(options))} "
                    "(copilot_here --help lists them; options for docker/podman go in "
                    "--engine-arg=...)"
                )
            if options[name] and "=" not in arg:
                value = argv[i + 1] if i + 1 < len(argv) else None
                if name in _optional_value(parser) and (value is None or value.startswith("-")):
                    i += 1
                    continue
                if value is None or (value.startswith("-") and value != "-"):
                    raise UsageError(
                        f"{name} needs a value"
                        + (f"; to pass {value!r}, write {name}={value}" if value else "")
                    )
                i += 2
                continue
            i += 1
            continue
        # The first word of the command (everything from here on is its own).
        as_option = "--" + arg.lstrip("-")
        looks = arg.startswith("network") or difflib.get_close_matches(
            as_option, [o for o in options if o.startswith("--")], 1, 0.85
        )
        if looks:
            hint = _did_you_mean(as_option, list(options)) or "; options start with --"
            raise UsageError(
                f"{arg!r} looks like an option, not a command{hint} (to run a command named "
                f"{arg}, put it after --: copilot_here -- {arg})"
            )
        return


def absolute_path(path: str) -> str:
    """PATH without its empty and relative entries. An empty entry (a stray `:`) or `.`
    means the current directory, which is the project: the agent's to write. The CLI
    runs git, gh and the engine from PATH as you (root, for the sandbox engine), so a
    `git` the agent left in the project would run on the host at the next start."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if os.path.isabs(d))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "PATH" in os.environ:
        os.environ["PATH"] = absolute_path(os.environ["PATH"])
    parser = build_parser()
    try:
        precheck(parser, argv)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"copilot_here: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        return dispatch(args)
    except UsageError as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProjectError as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        if len(exc.problems) == 1:
            print(f"copilot_here: {exc}", file=sys.stderr)
        else:
            print(f"copilot_here: invalid network config\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (trust.TrustError, hoststate.StateError, FileProblem) as exc:
        print(f"copilot_here: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # a file problem no check above named: still one line
        print(f"copilot_here: {describe_os_error(exc.filename, exc)}", file=sys.stderr)
        return EXIT_CONFIG


def home_dir() -> Path:
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        return Path(home)
    try:
        return Path.home()
    except (RuntimeError, KeyError):
        raise UsageError("no home directory: set HOME to an absolute path") from None


def dispatch(args: argparse.Namespace) -> int:
    hoststate.user_ids()  # before anything is written: a clear line on Windows
    home = home_dir()
    state = hoststate.state_root(home)
    out = sys.stdout
    if (args.no_inherit or args.force) and not (args.network_init or args.network_init_global):
        raise UsageError("--no-inherit and --force go with --network-init or --network-init-global")
    if args.method is not None and args.network_check is None and args.network_allow is None:
        raise UsageError("--method goes with --network-check or --network-allow")
    if args.method is not None and args.network_check is not None and len(args.method) > 1:
        raise UsageError("--network-check takes one --method")
    workflow.check_companions(args)
    if args.network_init_global:
        target = global_config_path(home)
        return cmd_init(target, args.no_inherit, args.force, state, home, out)
    if args.network_enable_global or args.network_disable_global:
        target = global_config_path(home)
        return cmd_set_enabled(target, args.network_enable_global, state, home, out)
    # Everything else works on a project (the git repository's root, or this directory).
    try:
        cwd = Path.cwd()
    except OSError as exc:
        raise FileProblem(
            f"the current directory is gone ({exc.strerror}). Fix: cd into the project again"
        ) from None
    project = check_project(find_project(cwd, home), home)
    if args.network_init:
        target = repo_config_path(project)
        return cmd_init(target, args.no_inherit, args.force, state, home, out)
    if args.network_show:
        return cmd_show(project, home, args.network_config_write, state, out, args.logs_dir)
    if args.network_trust:
        return cmd_trust(project, home, state, out)
    if args.network_enable or args.network_disable:
        _, path = find_config(project, home)
        target = path if path is not None else repo_config_path(project)
        return cmd_set_enabled(target, args.network_enable, state, home, out)
    if args.network_check is not None:
        method = "GET" if args.method is None else args.method[0]
        return cmd_check(project, home, args.network_check, method, out, state)
    code = workflow.dispatch(args, project, home, state, out)
    if code is not None:
        return code
    return run.run_from_args(args, project, home)


if __name__ == "__main__":
    sys.exit(main())
