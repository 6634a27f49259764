"""The CLI's options for going from monitor to enforce: the traffic log
(`--network-logs`), rules from it (`--network-suggest`, `--network-replay`) and
edits of the config (`--network-allow`, `-remove`, `-mode`, `-edit`, `-migrate`).
Parsed here, carried out by runtime.host.logcmds and runtime.host.editcmds."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from runtime.core.config import HTTP_METHODS
from runtime.core.suggest import DEFAULT_DEPTH
from runtime.host import editcmds, logcmds, logview
from runtime.host.netcmds import UsageError, check_method


def add_arguments(net: argparse._ArgumentGroup, actions: Any) -> None:
    """From monitor to enforce: the log, rules from it, and edits of the config."""
    actions.add_argument(
        "--network-logs",
        action="store_true",
        help="this project's traffic log, one line per request",
    )
    actions.add_argument(
        "--network-suggest",
        action="store_true",
        help="rules for what the log shows and the config does not allow, as a diff",
    )
    actions.add_argument(
        "--network-replay",
        nargs="?",
        const="",
        metavar="LOG",
        help="judge every request of the log (default this project's) against the config "
        "in use; exit 3 if any that went through would now be blocked",
    )
    actions.add_argument(
        "--network-allow", metavar="HOST[/PATH]", help="add a rule to the config in use"
    )
    actions.add_argument(
        "--network-remove",
        metavar="HOST[/PATH]",
        help="remove the rules for HOST (or PATH from them) from the config in use",
    )
    actions.add_argument(
        "--network-mode", choices=("monitor", "enforce"), help="set the mode of the config in use"
    )
    actions.add_argument(
        "--network-edit",
        action="store_true",
        help="edit the config in use in $VISUAL/$EDITOR; saved only when valid",
    )
    actions.add_argument(
        "--network-migrate",
        action="store_true",
        help="write the native equivalent of a config in copilot_here's Airlock format",
    )
    net.add_argument("-f", "--follow", action="store_true", help="--network-logs: keep printing")
    net.add_argument("--blocked", action="store_true", help="--network-logs: blocked requests")
    net.add_argument(
        "--violations",
        action="store_true",
        help="--network-logs: what monitor mode flagged (with --blocked: either)",
    )
    net.add_argument(
        "--since", metavar="WHEN", help="only requests since WHEN: 2h, 30m, 1d or a UTC time"
    )
    net.add_argument("--json", action="store_true", help="--network-logs: the JSON records")
    net.add_argument("--summary", action="store_true", help="--network-logs: per host")
    net.add_argument(
        "--dns", action="store_true", help="--network-logs: the DNS queries, not the requests"
    )
    net.add_argument(
        "--depth",
        type=int,
        default=DEFAULT_DEPTH,
        metavar="N",
        help=f"--network-suggest: path segments a rule keeps (default {DEFAULT_DEPTH})",
    )
    net.add_argument("--apply", action="store_true", help="--network-suggest: write the rules")
    net.add_argument(
        "--all",
        action="store_true",
        help="--network-suggest: every request the config would not allow, not only "
        "monitor-mode violations",
    )
    net.add_argument(
        "--accept-widening",
        action="store_true",
        help="--network-suggest --apply: also write the changes flagged as widening access",
    )
    net.add_argument(
        "--global",
        dest="use_global",
        action="store_true",
        help="--network-allow/-remove/-mode/-edit/-migrate: the global config",
    )


#: Each modifier and the commands it goes with.
COMPANIONS = {
    "follow": ("network_logs",),
    "blocked": ("network_logs",),
    "violations": ("network_logs",),
    "json": ("network_logs",),
    "summary": ("network_logs",),
    "dns": ("network_logs",),
    "since": ("network_logs", "network_suggest", "network_replay"),
    "apply": ("network_suggest",),
    "all": ("network_suggest",),
    "accept_widening": ("network_suggest",),
    "use_global": (
        "network_allow",
        "network_remove",
        "network_mode",
        "network_edit",
        "network_migrate",
    ),
}


def _flag(dest: str) -> str:
    return {"use_global": "--global", "follow": "-f/--follow"}.get(
        dest, "--" + dest.replace("_", "-")
    )


def check_companions(args: argparse.Namespace) -> None:
    """A modifier without its command is a usage error, never silently ignored."""
    for dest, commands in COMPANIONS.items():
        given = getattr(args, dest)
        if given in (None, False):
            continue
        if not any(getattr(args, c) not in (None, False) for c in commands):
            names = " or ".join(_flag(c) for c in commands)
            raise UsageError(f"{_flag(dest)} goes with {names}")
    if args.depth != DEFAULT_DEPTH and not args.network_suggest:
        raise UsageError("--depth goes with --network-suggest")
    if args.depth < 0:
        raise UsageError("--depth takes a number of path segments, 0 or more")
    if args.accept_widening and not args.apply:
        raise UsageError("--accept-widening goes with --network-suggest --apply")
    if args.follow and args.summary:
        raise UsageError("-f/--follow and --summary do not go together")


def suggest_command(args: argparse.Namespace) -> str:
    """This --network-suggest with its options, for the commands its output suggests."""
    argv = ["copilot_here", "--network-suggest"]
    if args.all:
        argv.append("--all")
    if args.depth != DEFAULT_DEPTH:
        argv += ["--depth", str(args.depth)]
    if args.since is not None:
        argv += ["--since", args.since]
    if args.logs_dir is not None:
        argv += ["--logs-dir", str(args.logs_dir)]
    return shlex.join(argv)


def dispatch(
    args: argparse.Namespace, project: Path, home: Path, state: Path, out: Any
) -> int | None:
    """The workflow commands; None when args name none of them."""
    since = None
    if args.since is not None:
        try:
            since = logview.parse_since(args.since)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    log = logcmds.log_file(project, home, args.logs_dir)
    if args.network_logs:
        view = logcmds.LogView(
            args.follow, args.blocked, args.violations, since, args.json, args.summary, args.dns
        )
        return logcmds.cmd_logs(log, view, out, sys.stderr)
    if args.network_suggest:
        return logcmds.cmd_suggest(
            project,
            home,
            state,
            log,
            args.depth,
            args.apply,
            args.all,
            args.accept_widening,
            since,
            out,
            suggest_command(args),
        )
    if args.network_replay is not None:
        chosen = Path(args.network_replay) if args.network_replay else log
        return logcmds.cmd_replay(project, home, chosen, since, out)
    edits = (
        args.network_allow,
        args.network_remove,
        args.network_mode,
        args.network_edit or None,
        args.network_migrate or None,
    )
    if all(e is None for e in edits):
        return None
    t = editcmds.target(project, home, args.use_global)
    if args.network_allow is not None:
        methods = [check_method(m) for m in args.method or []]
        for m in methods:
            if m not in HTTP_METHODS:  # what a rule may list
                raise UsageError(f"--method {m!r} is not an HTTP method: {', '.join(HTTP_METHODS)}")
        return editcmds.cmd_allow(t, args.network_allow, methods, state, home, out)
    if args.network_remove is not None:
        return editcmds.cmd_remove(t, args.network_remove, state, home, out)
    if args.network_mode is not None:
        return editcmds.cmd_mode(t, args.network_mode, state, home, out)
    if args.network_edit:
        return editcmds.cmd_edit(t, state, home, out, sys.stderr)
    return editcmds.cmd_migrate(t, home, state, out)
