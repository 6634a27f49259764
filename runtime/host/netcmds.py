"""The `--network-*` commands of the host CLI: they read and write the same files,
through the same core, as the container (runtime.resolve, runtime.core)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runtime import fsutil, paths
from runtime.core.config import AIRLOCK, parse_config
from runtime.core.explain import explain, explain_port
from runtime.core.hosts import HostError, normalize_host
from runtime.core.policy import Mode, Request
from runtime.core.wellformed import is_token
from runtime.host import github, hostlogs, trust
from runtime.host.fileproblems import FileProblem, problem
from runtime.registries import REGISTRIES_FILE
from runtime.resolve import (
    GLOBAL,
    REPO,
    Resolved,
    airlock_global_path,
    find_config,
    global_config_path,
    resolve,
)

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_BLOCKED = 0, 1, 2, 3

TEMPLATE: dict[str, Any] = {
    "enabled": False,
    "inherit_defaults": True,
    "mode": "monitor",
    "log_to_file": False,
    "allowed_rules": [],
}
NO_INHERIT_RULES = [
    {"host": "github.com"},
    {"host": "api.github.com"},
    {"host": "copilot-proxy.githubusercontent.com"},
]


def template(no_inherit: bool) -> dict[str, Any]:
    data = dict(TEMPLATE)
    if no_inherit:
        data["inherit_defaults"] = False
        data["allowed_rules"] = [dict(rule) for rule in NO_INHERIT_RULES]
    return data


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------
# Files


def dump(data: dict[str, Any]) -> str:
    """The config as the CLI writes it: keys in their order, one rule per line (so a
    diff of a change shows the rules that changed, and nothing else)."""
    rules = data.get("allowed_rules")
    if not isinstance(rules, list) or not rules:
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    marker = "\x00rules\x00"
    text = json.dumps({**data, "allowed_rules": marker}, indent=2, ensure_ascii=False)
    lines = ",\n".join(f"    {json.dumps(rule, ensure_ascii=False)}" for rule in rules)
    return text.replace(json.dumps(marker), "[\n" + lines + "\n  ]") + "\n"


def atomic_write(path: Path, text: str, follow: bool = False) -> None:
    """Replace the config atomically, keeping the file's mode. With `follow` (the global
    config) a symlink is written through: the file it points to is replaced in its own
    directory and the link stays (dotfiles), never replaced by a plain file."""
    target = Path(os.path.realpath(path)) if follow and os.path.islink(path) else path
    try:
        if target.is_dir():
            raise FileProblem(f"{target} is a directory, not a file. Fix: move it away")
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
        fsutil.atomic_write(target, text, mode)
    except OSError as exc:
        raise problem(target, exc, "write") from None


def config_kind(path: Path, home: Path) -> str:
    """GLOBAL for the user's own files (ours, and copilot_here's global Airlock config)."""
    return GLOBAL if path in (global_config_path(home), airlock_global_path(home)) else REPO


def read_text(path: Path) -> str:
    """A config's text: UTF-8, a byte-order mark accepted (and dropped when the CLI
    writes the file back). One line naming the file and the fix otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise problem(path, exc) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileProblem(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}). "
            "Fix: save it as UTF-8"
        ) from None


def write_config(path: Path, text: str, state: Path, home: Path, out) -> None:
    """Write a config through the CLI and approve what was written: the user chose
    it. Not when the file was untrusted before (an edit of a cloned repo's config
    would otherwise approve the rest of it unseen): that still needs a review."""
    kind = config_kind(path, home)
    before = trust.check(state, kind, path)
    trust.ready(state)  # the approval must be recordable before the file changes
    atomic_write(path, text, follow=kind == GLOBAL)
    if before.trusted:
        trust.approve(state, path, text.encode("utf-8"))
    else:
        print(
            f"Note: {before.name} was not trusted before this change ({before.state}); "
            f"runs refuse it until you review and approve it: {trust.TRUST_COMMAND}",
            file=out,
        )


def load_ordered(path: Path, airlock: bool | None = None) -> dict[str, Any]:
    """The file as written (key order kept), validated so we never write a broken config."""
    text = read_text(path)
    parse_config(text, str(path), airlock)  # ConfigError naming the file, field and fix
    return json.loads(text)


# ---------------------------------------------------------------------------
# Commands


def cmd_init(target: Path, no_inherit: bool, force: bool, state: Path, home: Path, out) -> int:
    if target.is_dir():
        raise FileProblem(f"{target} is a directory, not a file. Fix: move that directory away")
    if target.exists() and not force:
        print(
            f"A network config already exists at {target}; it was left unchanged "
            "(use --force to replace it).",
            file=out,
        )
        return EXIT_OK
    kind = config_kind(target, home)
    if kind == REPO:
        trust.config_dir_check(target)
    text = dump(template(no_inherit))
    trust.ready(state)  # the approval must be recordable before the file changes
    atomic_write(target, text, follow=kind == GLOBAL)
    # The whole file comes from the CLI: approved, whatever was there before.
    trust.approve(state, target, text.encode("utf-8"))
    print(f"Created {target}", file=out)
    return EXIT_OK


def cmd_set_enabled(target: Path, enabled: bool, state: Path, home: Path, out) -> int:
    airlock = True if target == airlock_global_path(home) else None
    if target.exists():
        data = load_ordered(target, airlock)
        created = False
    else:
        data = template(no_inherit=False)
        created = True
    data["enabled"] = enabled
    # Either format (an Airlock file keeps its own keys); copilot_here's global is Airlock's.
    parse_config(dump(data), str(target), airlock)
    write_config(target, dump(data), state, home, out)
    created_text = " (created)" if created else ""
    if not enabled:
        log = " (the traffic log stays on: log_to_file)" if data.get("log_to_file") else ""
        print(
            f"Secure proxy disabled in {target}{created_text}: allow-all, every request goes "
            f"through{log}.",
            file=out,
        )
        return EXIT_OK
    mode = data.get("mode", "monitor")
    print(f"Secure proxy enabled in {target}{created_text}. Mode now in force: {mode}", file=out)
    if mode == "enforce":
        print("  enforce: requests the rules do not allow are blocked (403).", file=out)
    else:
        print(
            "  monitor: every request is judged and logged, nothing is blocked; the traffic log\n"
            '  marks what enforce mode would block ("violation": true). To block it, set\n'
            f'  "mode": "enforce" in {target}',
            file=out,
        )
    return EXIT_OK


def unlisted_registries_note(resolved: Resolved) -> str | None:
    """Where the installer recorded no registry hosts (a host install), the built-in
    package-registry rules are the image's: say so rather than guess them here."""
    if not resolved.unlisted_registries:
        return None
    names = ", ".join(resolved.unlisted_registries)
    return (
        f"Package registries ({names}): the built-in rules also allow the registry hosts "
        "recorded in the image at install time; they are not listed here (this host has "
        f"no record of them: {paths.share_dir() / REGISTRIES_FILE})"
    )


def describe_rules(resolved: Resolved) -> list[str]:
    lines = []
    for rule in resolved.policy.rules:
        paths_text = ", ".join(e.text for e in rule.allowed_paths) or "all paths"
        methods = ", ".join(sorted(rule.methods)) if rule.methods else "all methods"
        if rule.schemes is not None:  # https only, or nothing at all
            methods += f" ({', '.join(sorted(rule.schemes)) or 'no scheme'})"
        if not rule.http:
            paths_text, methods = "no HTTP", ""
        if rule.ports:
            methods = (
                (methods + " " if methods else "")
                + "ports "
                + ",".join(str(p) for p in sorted(rule.ports))
            )
        lines.append(f"  {rule.host:<40} {paths_text:<24} {methods:<14} [{rule.origin.label}]")
    return lines


def format_lines(resolved: Resolved) -> list[str]:
    """For --network-show: the file's format, and for Airlock's, how it is read."""
    if resolved.config.format != AIRLOCK:
        return []
    lines = [
        "Format: Airlock (copilot_here's network.json), read as the native rules below "
        "(copilot_here --network-migrate writes them as a native file)"
    ]
    lines += [f"  narrower here: {note}" for note in resolved.config.notes]
    return lines


def trust_lines(state: Path, project: Path, home: Path) -> list[str]:
    lines = []
    for c in trust.in_use(state, project, home):
        if c.state == trust.ABSENT:
            continue
        if c.trusted:
            how = (
                f"approved {c.approval.approved_at}, sha256 {c.approval.sha256[:12]}"
                if c.approval
                else "your global config; it needs no approval until a writable run changes it"
            )
            lines.append(f"Trust: {c.path} is trusted ({how})")
        else:
            lines.append(
                f"Trust: NOT TRUSTED: {c.headline()}. Runs refuse to start until you review "
                f"and approve it: {trust.TRUST_COMMAND}"
            )
    return lines


def repository_lines(resolved: Resolved, state: Path, project: Path) -> list[str]:
    """Where {{GITHUB_OWNER}}/{{GITHUB_REPO}} come from, and the rule paths left out
    without them (only when a rule in force names them)."""
    if resolved.policy.mode is Mode.ALLOW_ALL or not resolved.templated:
        return []
    lines = github.show_lines(state, project)
    if resolved.unfilled:
        lines.append(
            f"Rule paths left out for want of a GitHub repository ({len(resolved.unfilled)}):"
        )
        lines += [f"  {entry}" for entry in resolved.unfilled]
    return lines


def cmd_show(
    project: Path,
    home: Path,
    config_write: bool,
    state: Path,
    out,
    logs_dir: Path | None = None,
) -> int:
    resolved = resolve(project, home, values=github.check(state, project).values)
    policy = resolved.policy
    print(f"Config source: {resolved.source} ({resolved.kind_label})", file=out)
    for line in format_lines(resolved):
        print(line, file=out)
    for line in trust_lines(state, project, home):
        print(line, file=out)
    for line in repository_lines(resolved, state, project):
        print(line, file=out)
    if policy.mode is Mode.ALLOW_ALL:
        print("Rules: DISABLED (allow-all mode: every request goes through)", file=out)
    else:
        print(f"Rules: ENABLED (mode: {policy.mode.value})", file=out)
    print(f"Traffic log: {resolved.logging} ({paths.traffic_log()} in the container)", file=out)
    host_logs = hostlogs.logs_source(project, home, logs_dir)
    print(f"Traffic log on the host: {host_logs / paths.traffic_log().name}", file=out)
    print(
        f"Inherit built-in defaults: {'yes' if resolved.config.inherit_defaults else 'no'}",
        file=out,
    )
    if resolved.path is not None:
        mount = (
            "writable (--network-config-write)"
            if config_write
            else ("read-only (pass --network-config-write to edit rules live)")
        )
        print(f"Config mount in a run: {mount}", file=out)
    if policy.mode is not Mode.ALLOW_ALL:
        print(f"Allowed rules ({len(policy.rules)}):", file=out)
        lines = describe_rules(resolved)
        print("\n".join(lines) if lines else "  (none: every request is a violation)", file=out)
        note = unlisted_registries_note(resolved)
        if note:
            print(note, file=out)
    return EXIT_OK


def cmd_trust(project: Path, home: Path, state: Path, out) -> int:
    """Show what changed since the last approval, then approve it."""
    checks = trust.pending(state, project, home)
    repository = github.trust_pending(state, project, out)  # a changed origin
    if not checks:
        kind, path = find_config(project, home)
        what = f"the {trust.NAMES[kind]} {path}" if path else "no config file (built-in defaults)"
        print(
            f"{'Nothing else' if repository else 'Nothing'} to approve: {what} is trusted.",
            file=out,
        )
        return EXIT_OK
    for c in checks:
        print(f"{c.headline()[0].upper()}{c.headline()[1:]}.", file=out)
        print(c.body(), end="", file=out)
        if c.current is not None:
            # A broken config cannot take effect: fix it first (the error names the fix).
            parse_config(c.text.removeprefix("\ufeff"), str(c.path))
    for c in checks:  # the bytes shown, not a re-read
        trust.approve(state, c.path, c.current)
        if c.current is None:
            print(f"Approved: {c.path} stays removed.", file=out)
        else:
            print(f"Approved {c.path} (sha256 {trust.sha256(c.current)[:12]}).", file=out)
    return EXIT_OK


def check_method(method: str) -> str:
    if len(method) > 32 or not is_token(method):
        raise UsageError(f"--method {method!r} is not an HTTP method (GET, POST, PUT, ...)")
    return method.upper()


def request_for_url(url: str, method: str) -> Request:
    try:
        parts = urlsplit(url if "://" in url else "https://" + url)
        hostname = parts.hostname
    except ValueError as exc:
        raise UsageError(f"--network-check {url!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise UsageError(f"--network-check needs an http(s) URL, not {url!r}")
    try:
        normalize_host(hostname)
    except HostError as exc:
        raise UsageError(f"--network-check {url!r}: not a host name ({exc})") from None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UsageError(f"bad port in {url!r}: {exc}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Request(
        method=method,
        path=path,
        scheme=parts.scheme,
        port=port,
        sni=hostname if parts.scheme == "https" else None,
        host_header=hostname,
    )


#: Ports that are never a rule's `ports`: HTTP(S) is judged as a request, DNS by the guard.
NOT_PORTS = {80: "http://", 443: "https://", 53: None}
SCP_LIKE = re.compile(r"^(?:[^@/\s]+@)?(?P<host>\[[^\]]+\]|[^:/\s\[\]]+):(?!//)")


def port_target(url: str) -> tuple[str, int] | None:
    """(host, port) for `ssh://[user@]host[:port]/...`, `tcp://host:port` or git's
    `user@host:path`; None for anything else (an HTTP URL)."""
    text = url.strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme is None:
        match = SCP_LIKE.match(text)
        if match is None or "@" not in text.split(":", 1)[0]:
            return None
        host, port = match.group("host").strip("[]"), 22
    elif scheme in ("ssh", "git+ssh", "tcp"):
        try:
            parts = urlsplit(text)
            host, explicit = parts.hostname, parts.port
        except ValueError as exc:
            raise UsageError(f"--network-check {url!r}: bad address ({exc})") from None
        if not host:
            raise UsageError(f"--network-check {url!r} names no host")
        if scheme == "tcp" and explicit is None:
            raise UsageError(f"--network-check {url!r}: write the port, as in tcp://{host}:5432")
        port = explicit or 22
    else:
        return None
    try:
        host = normalize_host(host)
    except HostError as exc:
        raise UsageError(f"--network-check {url!r}: not a host name ({exc})") from None
    if port in NOT_PORTS:
        how = NOT_PORTS[port]
        raise UsageError(
            f"--network-check {url!r}: port {port} is "
            + (f"judged per request: check {how}{host}/path" if how else "always the DNS guard's")
        )
    return host, port


def cmd_check(
    project: Path, home: Path, url: str, method: str, out, state: Path | None = None
) -> int:
    """Exit 0 when the request would go through, EXIT_BLOCKED when the policy blocks
    it, or (monitor mode) would block it in enforce mode. `ssh://`, `tcp://host:port`
    and git's `user@host:path`: whether a rule's ports open that TCP port."""
    values = github.check(state, project).values if state is not None else {}
    resolved = resolve(project, home, values=values)
    target = port_target(url)
    if target is not None:
        allowed, text = explain_port(resolved.policy, *target, url, resolved.source)
        print(text, end="", file=out)
        return EXIT_OK if allowed else EXIT_BLOCKED
    request = request_for_url(url, check_method(method))
    try:
        decision = resolved.policy.decide(request)
    except HostError as exc:
        raise UsageError(f"--network-check {url!r}: {exc}") from None
    print(explain(decision, request.method, url, resolved.source), end="", file=out)
    note = unlisted_registries_note(resolved)
    refused = decision.blocked or decision.violation
    if note and refused:
        print(f"note: {note}", file=out)
    return EXIT_BLOCKED if refused else EXIT_OK
