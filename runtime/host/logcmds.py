"""`--network-logs`, `--network-suggest`, `--network-replay`: from what the agent did
to the rules that allow it (runtime.host.logview reads the log; runtime.core.suggest
turns it into rules and judges it again)."""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from runtime import paths
from runtime.core.config import AIRLOCK, parse_config
from runtime.core.policy import Mode
from runtime.core.suggest import RuleChange, apply_changes, replay, suggest
from runtime.host import hostlogs, logview
from runtime.host.netcmds import (
    EXIT_BLOCKED,
    EXIT_CONFIG,
    EXIT_OK,
    dump,
    load_ordered,
    read_text,
    template,
    write_config,
)
from runtime.host.trust import visible
from runtime.resolve import AIRLOCK_GLOBAL, repo_config_path, resolve

MIGRATE = "copilot_here --network-migrate"
ACCEPT = "--accept-widening"
#: Requests no rule should be made for: domain fronting, and refusals no rule can lift.
NOT_SUGGESTED = ("host_mismatch", "not_http", "log_unavailable")


def log_file(project: Path, home: Path, logs_dir: Path | None) -> Path:
    return hostlogs.logs_source(project, home, logs_dir) / paths.traffic_log().name


@dataclass(frozen=True)
class LogView:
    follow: bool = False
    blocked: bool = False
    violations: bool = False
    since: datetime | None = None
    json: bool = False
    summary: bool = False
    dns: bool = False

    def keep(self, entry: logview.Entry) -> bool:
        return bool(
            logview.select(
                [entry], self.blocked, self.violations, self.since, "dns" if self.dns else "http"
            )
        )


def colour_for(out: TextIO) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ


def cmd_logs(log: Path, view: LogView, out: TextIO, err: TextIO) -> int:
    """The project's traffic log, one readable line per request (or the records, or a
    summary per host); with `follow`, what is appended until Ctrl-C."""
    colour = colour_for(out)

    def render(entry: logview.Entry) -> str:
        return json.dumps(dict(entry.raw)) if view.json else logview.format_entry(entry, colour)

    read, offset = logview.read_whole_lines(log) if view.follow else (logview.read_log(log), 0)
    chosen = [e for e in read.entries if view.keep(e)]
    if view.summary:
        lines = logview.format_summary(logview.summarize(chosen))
    else:
        lines = [render(e) for e in chosen]
    for line in lines:
        print(line, file=out)
    if not os.path.exists(log):
        print(
            f"No traffic log yet at {log}: a run writes one when rules are enabled "
            '(monitor mode always logs) or "log_to_file" is true.',
            file=err,
        )
    elif not lines and not view.follow:
        print(f"No {'DNS queries' if view.dns else 'requests'} match in {log}.", file=err)
    if read.broken:
        print(
            f"note: {read.broken} line(s) of {log} could not be read (cut short by a crash "
            "or a full disk); they are left out.",
            file=err,
        )
    if view.follow:
        out.flush()
        try:
            for _ in logview.follow(log, out, render, keep=view.keep, offset=offset):
                pass
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


# ----------------------------------------------------------------------------- suggest


def _http(entries: Iterable[logview.Entry], since: datetime | None) -> list[logview.Entry]:
    return [
        e
        for e in entries
        if e.kind == "http" and e.reason not in NOT_SUGGESTED and (since is None or e.ts >= since)
    ]


def describe_change(change: RuleChange) -> list[str]:
    paths_text = ", ".join(change.allowed_paths) if change.allowed_paths else "every path"
    methods = ", ".join(change.methods) if change.methods else "every method"
    mark = "!" if change.warnings else "+"
    what = "adds to your rule for" if change.extends else "new rule for"
    count = f"{change.requests} request{'s' if change.requests != 1 else ''}"
    lines = [f"  {mark} {what} {change.host}: {paths_text}; {methods} ({count})"]
    lines += [f"      ! {w}" for w in change.warnings]
    if change.carried:
        lines.append(
            f"      (keeps the {len(change.carried)} rule(s) that decide {change.host} now by "
            "copying them: a rule of yours for a host replaces the built-in ones)"
        )
    return lines


def diff(before: str, after: str, path: Path) -> str:
    lines = difflib.unified_diff(
        visible(before).splitlines(),
        visible(after).splitlines(),
        f"{path} (now)",
        f"{path} (suggested)",
        lineterm="",
    )
    return "".join(f"{line}\n" for line in lines)


def cmd_suggest(
    project: Path,
    home: Path,
    state: Path,
    log: Path,
    depth: int,
    apply: bool,
    every: bool,
    accept_widening: bool,
    since: datetime | None,
    out: TextIO,
    command: str = "copilot_here --network-suggest",
) -> int:
    """Rules for what was seen and is not allowed, as a diff of the config in use;
    `apply` writes them, widening ones only with `accept_widening`. `command` is this
    invocation (its options), for the command lines the output suggests."""
    resolved = resolve(project, home)
    if not os.path.exists(log):
        print(f"No traffic log at {log}: run in monitor mode first.", file=out)
        return EXIT_OK
    read = logview.read_log(log)
    entries = _http(read.entries, since)
    what = "every request" if every else "monitor-mode violations"
    if not every:
        entries = [e for e in entries if e.violation]
    changes = suggest(logview.to_seen(entries), resolved.policy, depth)
    target = resolved.path if resolved.path is not None else repo_config_path(project)
    source = f"{len(entries)} request(s) of {log} ({what})"
    if not changes:
        print(f"Nothing to suggest: {resolved.source} already allows {source}.", file=out)
        if not every:
            print("  (--all: every request the current config would not allow)", file=out)
        return EXIT_OK
    print(f"Suggested rules for {target}, from {source}:", file=out)
    for change in changes:
        for line in describe_change(change):
            print(line, file=out)
    if resolved.config.format == AIRLOCK or resolved.kind == AIRLOCK_GLOBAL:
        print(
            f"{'copilot_here: ' if apply else ''}{target} is in copilot_here's Airlock format; "
            f"the CLI writes rules in the native format only. Fix: {MIGRATE}, then suggest "
            "again.",
            file=sys.stderr if apply else out,
        )
        return EXIT_CONFIG if apply else EXIT_OK
    if target.exists():
        before_text = read_text(target).removeprefix("\ufeff")
        data = load_ordered(target)
    else:
        data = template(no_inherit=False)
        before_text = ""
    rules = list(data.get("allowed_rules", []))
    widening = [c for c in changes if c.warnings]
    print(
        diff(before_text, dump({**data, "allowed_rules": apply_changes(rules, changes)}), target),
        end="",
        file=out,
    )
    if widening:
        names = ", ".join(c.host for c in widening)
        print(f"! {len(widening)} change(s) widen access beyond what was seen: {names}", file=out)
    if not apply:
        print(
            f"To write this: {command} --apply"
            + (f" (flagged changes only with {ACCEPT})" if widening else ""),
            file=out,
        )
        return EXIT_OK
    chosen = changes if accept_widening else [c for c in changes if not c.warnings]
    if not chosen:
        print(
            f"Nothing written: every change is flagged; to apply them: {command} --apply {ACCEPT}",
            file=out,
        )
        return EXIT_OK
    new = {**data, "allowed_rules": apply_changes(rules, chosen)}
    text = dump(new)
    parse_config(text, str(target))  # a write never leaves an invalid file
    write_config(target, text, state, home, out)
    print(f"Wrote {len(chosen)} change(s) to {target}.", file=out)
    left = [c for c in changes if c not in chosen]
    if left:
        print(
            f"Not applied ({len(left)}, they widen access): {', '.join(c.host for c in left)}. "
            f"To apply them too: {command} --apply {ACCEPT}",
            file=out,
        )
    return EXIT_OK


# ----------------------------------------------------------------------------- replay


def _grouped(items: Iterable[object]) -> list[str]:
    counts: dict[str, int] = {}
    for r in items:
        seen = r.item  # type: ignore[attr-defined]
        rule = f" (rule: {r.rule})" if r.rule else ""  # type: ignore[attr-defined]
        key = f"{seen.method} {seen.scheme}://{seen.host}{seen.path}  {r.reason}{rule}"  # type: ignore[attr-defined]
        counts[key] = counts.get(key, 0) + 1
    return [f"  {k}" + (f"  x{n}" if n > 1 else "") for k, n in counts.items()]


def cmd_replay(project: Path, home: Path, log: Path, since: datetime | None, out: TextIO) -> int:
    """Judge every recorded request against the config in use, as enforce mode would;
    print what changes. Exit 3 when something that went through would now be blocked."""
    resolved = resolve(project, home)
    if not os.path.exists(log):
        print(f"No traffic log at {log}: nothing to replay.", file=out)
        return EXIT_OK
    entries = _http(logview.read_log(log).entries, since)
    seen = logview.to_seen(entries)
    report = replay(seen, resolved.policy)
    print(
        f"Replayed {len(seen)} request(s) of {log} against {resolved.source} "
        "(judged as enforce mode would):",
        file=out,
    )
    if resolved.policy.mode is Mode.ALLOW_ALL:
        print("  rules are disabled (enabled: false): everything would go through", file=out)
    if report.newly_blocked:
        print(f"Would now be BLOCKED ({len(report.newly_blocked)}):", file=out)
        print("\n".join(_grouped(report.newly_blocked)), file=out)
    if report.newly_allowed:
        print(f"Would now be ALLOWED ({len(report.newly_allowed)}):", file=out)
        print("\n".join(_grouped(report.newly_allowed)), file=out)
    print(f"Unchanged: {report.unchanged}", file=out)
    return EXIT_BLOCKED if report.newly_blocked else EXIT_OK
