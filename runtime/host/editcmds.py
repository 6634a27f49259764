"""Editing the config from the CLI: `--network-allow`, `--network-remove`,
`--network-mode`, `--network-edit`, `--network-migrate`.

Each acts on the config in use (repo, else global; a new repo config when there is
none) or, with `--global`, on the global one; each validates the new text before it
writes it (a write never leaves an invalid file), writes atomically with the key
order kept, and records the approval as every CLI write does (netcmds.write_config).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from runtime.core.config import (
    AIRLOCK,
    ConfigError,
    NetworkConfig,
    Problem,
    _check_host,
    _check_path,
    parse_config,
)
from runtime.core.hosts import normalize_host_pattern
from runtime.core.policy import BUILT_IN, Mode, Policy, Request
from runtime.core.suggest import RuleChange, apply_changes, carried_rules
from runtime.host.netcmds import (
    EXIT_CONFIG,
    EXIT_OK,
    UsageError,
    dump,
    read_text,
    template,
    write_config,
)
from runtime.resolve import (
    AIRLOCK_GLOBAL,
    GLOBAL,
    REPO,
    compile_resolved,
    find_config,
    global_config_path,
    repo_config_path,
)
from runtime.resolve import (
    BUILT_IN as NO_FILE,
)

MIGRATE = "copilot_here --network-migrate"
EVERY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass
class Target:
    """The file an edit acts on, as it is now."""

    kind: str  # REPO, GLOBAL or AIRLOCK_GLOBAL
    path: Path
    exists: bool
    text: str  # "" when it does not exist
    data: dict[str, Any]  # key order kept
    config: NetworkConfig

    @property
    def airlock(self) -> bool:
        return self.config.format == AIRLOCK

    def parse(self, text: str) -> NetworkConfig:
        return parse_config(text, str(self.path), True if self.kind == AIRLOCK_GLOBAL else None)


def target(project: Path, home: Path, use_global: bool) -> Target:
    if use_global:
        kind, path = GLOBAL, global_config_path(home)
    else:
        kind, found = find_config(project, home)
        path = found if found is not None else repo_config_path(project)
        kind = REPO if kind == NO_FILE else kind
    if not os.path.lexists(path):
        data = template(no_inherit=False)
        t = Target(kind, path, False, "", data, NetworkConfig())
        t.config = t.parse(dump(data))
        return t
    text = read_text(path).removeprefix("\ufeff")
    t = Target(kind, path, True, text, {}, NetworkConfig())
    t.config = t.parse(text)
    t.data = json.loads(text)
    return t


def save(t: Target, data: dict[str, Any], state: Path, home: Path, out: TextIO) -> str:
    text = dump(data)
    t.parse(text)  # raises ConfigError: nothing is written
    write_config(t.path, text, state, home, out)
    return text


def refuse_airlock(t: Target, what: str) -> None:
    if t.airlock:
        raise ConfigError(
            str(t.path),
            [
                Problem(
                    "",
                    f"is in copilot_here's Airlock format; {what} writes native rules only",
                    f"{MIGRATE} (it writes the native equivalent), then {what} again",
                )
            ],
        )


# ----------------------------------------------------------------------------- HOST[/PATH]


def parse_host_path(value: str, option: str) -> tuple[str, str | None]:
    """`api.github.com`, `api.github.com/repos/`, or a URL: (host pattern, path or None)."""
    text = value.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
        except ValueError as exc:
            raise UsageError(f"{option} {value!r} is not a URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise UsageError(f"{option} {value!r}: rules are for http(s) URLs")
        if parts.query or parts.fragment:
            raise UsageError(f"{option} {value!r}: rules match paths without a query")
        host, path = parts.netloc, parts.path or None
    else:
        host, slash, rest = text.partition("/")
        path = "/" + rest if slash else None
    problems: list[Problem] = []
    _check_host(host, "host", problems)
    if path is not None and path != "/":
        _check_path(path, "path", problems)
    if problems:
        p = problems[0]
        raise UsageError(f"{option} {value!r}: {p.message}. Fix: {p.fix}")
    return normalize_host_pattern(host), (None if path in (None, "/") else path)


def _sample_request(host: str, path: str | None, method: str) -> Request:
    name = host.removeprefix("*.") if host.startswith("*.") else host
    name = f"sample.{name}" if host.startswith("*.") else name
    sample = (path or "/").lstrip("=")
    return Request(method=method, path=sample, sni=name, host_header=name)


def _allowed(policy: Policy, host: str, path: str | None, methods: tuple[str, ...]) -> bool:
    enforce = Policy.build(Mode.ENFORCE, False, policy.rules, policy.source)
    if path is None:  # the whole host: only a rule for every path does it
        rules = enforce.rules_for_host(host)
        return any(not r.allowed_paths and all(r.allows_method(m) for m in methods) for r in rules)
    return all(not enforce.decide(_sample_request(host, path, m)).blocked for m in methods)


def cmd_allow(
    t: Target, value: str, methods: list[str], state: Path, home: Path, out: TextIO
) -> int:
    refuse_airlock(t, "--network-allow")
    host, path = parse_host_path(value, "--network-allow")
    wanted = tuple(dict.fromkeys(m.upper() for m in methods)) or None
    # Judged as if enabled: the rules are what is edited, whether in force yet or not.
    enabled_policy = compile_resolved(
        t.kind, t.path, t.parse(dump({**t.data, "enabled": True}))
    ).policy
    if _allowed(enabled_policy, host, path, wanted or EVERY_METHOD):
        shown = ", ".join(wanted) if wanted else "every method"
        print(f"Already allowed by {t.path}: {value} ({shown}); nothing written.", file=out)
        return EXIT_OK
    change = RuleChange(
        host=host,
        allowed_paths=(path,) if path else (),
        methods=wanted,
        extends=False,
        requests=0,
        carried=carried_rules(enabled_policy, host),
    )
    rules = apply_changes(list(t.data.get("allowed_rules", [])), [change])
    save(t, {**t.data, "allowed_rules": rules}, state, home, out)
    print(f"Allowed in {t.path}: {json.dumps(change.to_json())}", file=out)
    if change.carried:
        print(
            f"  (the {len(change.carried)} rule(s) that decided {host} before were copied "
            "with it: a rule of yours for a host replaces the built-in ones)",
            file=out,
        )
    _not_enabled_note(t, out)
    return EXIT_OK


def cmd_remove(t: Target, value: str, state: Path, home: Path, out: TextIO) -> int:
    refuse_airlock(t, "--network-remove")
    host, path = parse_host_path(value, "--network-remove")
    kept: list[Any] = []
    removed: list[str] = []
    for rule in t.data.get("allowed_rules", []):
        same = isinstance(rule, dict) and _pattern(rule.get("host")) == host
        if not same:
            kept.append(rule)
        elif path is None:
            removed.append(json.dumps(rule))
        elif path in (rule.get("allowed_paths") or []):
            rest = [p for p in rule["allowed_paths"] if p != path]
            removed.append(f"{path} from {json.dumps(rule)}")
            if rest:  # a rule left with no path would allow every path: it goes
                kept.append({**rule, "allowed_paths": rest})
        else:
            kept.append(rule)
    if not removed:
        what = f"no rule for {host}" if path is None else f"no rule for {host} lists {path}"
        print(f"copilot_here: nothing removed: {t.path} has {what}.", file=sys.stderr)
        return EXIT_CONFIG
    save(t, {**t.data, "allowed_rules": kept}, state, home, out)
    for line in removed:
        print(f"Removed from {t.path}: {line}", file=out)
    after = t.parse(dump({**t.data, "allowed_rules": kept, "enabled": True}))
    policy = compile_resolved(t.kind, t.path, after).policy
    if any(r.origin.kind == BUILT_IN for r in policy.rules_for_host(host.removeprefix("*."))):
        print(f"  note: the built-in rules for {host} apply again (inherit_defaults)", file=out)
    return EXIT_OK


def _pattern(host: Any) -> str | None:
    try:
        return normalize_host_pattern(str(host))
    except ValueError:
        return None


def _not_enabled_note(t: Target, out: TextIO) -> None:
    if not t.data.get("enabled", False):
        print(
            f'  note: rules are disabled in {t.path} ("enabled": false): they apply once you '
            "run copilot_here --network-enable",
            file=out,
        )


def cmd_mode(t: Target, mode: str, state: Path, home: Path, out: TextIO) -> int:
    before = t.config.mode.value if t.exists else None
    data = {**t.data, "mode": mode}
    # Monitor mode logs whatever log_to_file says; leaving it for enforce keeps the log
    # on (the end-of-run line and --network-logs read it), unless the file says false
    # while already in enforce mode, i.e. the user chose so.
    keep_log = mode == "enforce" and before != "enforce" and not t.config.log_to_file
    if keep_log and t.airlock:
        data["enable_logging"] = True
    elif keep_log:
        data["log_to_file"] = True
    save(t, data, state, home, out)
    print(f"Mode in {t.path}: {mode}" + (f" (was {before})" if before else ""), file=out)
    if mode == "enforce":
        print("  enforce: requests the rules do not allow are blocked (403).", file=out)
        if keep_log:
            key = "enable_logging" if t.airlock else "log_to_file"
            print(
                f'  The traffic log stays on ("{key}": true, as monitor mode had it): '
                "copilot_here --network-logs --blocked lists what was blocked.",
                file=out,
            )
    else:
        print("  monitor: nothing is blocked; what enforce would block is logged.", file=out)
    _not_enabled_note(t, out)
    return EXIT_OK


# ----------------------------------------------------------------------------- --network-edit


def editor_argv() -> list[str]:
    for var in ("VISUAL", "EDITOR"):
        value = os.environ.get(var, "").strip()
        if value:
            return shlex.split(value)
    return ["vi"]


def cmd_edit(
    t: Target, state: Path, home: Path, out: TextIO, err: TextIO, attempts: int = 5
) -> int:
    """$VISUAL/$EDITOR on a temporary copy; the file is replaced only by a valid text.
    An invalid one is shown with its problems and the editor opens again (on a terminal
    you may also give up); the file is never left invalid."""
    original = t.text if t.exists else dump(t.data)
    with tempfile.TemporaryDirectory(prefix="copilot_here-edit-") as tmp:
        copy = Path(tmp) / "network.json"
        copy.write_text(original, encoding="utf-8")
        for attempt in range(1, attempts + 1):
            argv = [*editor_argv(), str(copy)]
            try:
                code = subprocess.call(argv)
            except OSError as exc:
                raise UsageError(
                    f"cannot start the editor {argv[0]!r} ({exc.strerror}). Fix: set EDITOR"
                ) from None
            if code != 0:
                print(f"The editor exited with {code}; {t.path} is unchanged.", file=err)
                return EXIT_CONFIG
            text = copy.read_text(encoding="utf-8", errors="replace")
            if text == original:
                print(f"No changes; {t.path} is unchanged.", file=out)
                return EXIT_OK
            try:
                t.parse(text)
            except ConfigError as exc:
                shown = str(exc).replace(str(t.path), f"{t.path} (your edit)")
                print(f"copilot_here: not saved, the edit is invalid:\n{shown}", file=err)
                if attempt == attempts or not _again(err):
                    print(f"{t.path} is unchanged.", file=err)
                    return EXIT_CONFIG
                continue
            write_config(t.path, text, state, home, out)
            print(f"Saved {t.path}.", file=out)
            return EXIT_OK
    return EXIT_CONFIG


def _again(err: TextIO) -> bool:
    """On a terminal, ask (as visudo does); otherwise edit again."""
    if not (sys.stdin.isatty() and err.isatty()):
        print("Opening the editor again.", file=err)
        return True
    print("What now? (e)dit again, e(x)it without saving [e] ", end="", file=err, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("", "e", "edit")


# ----------------------------------------------------------------------------- --network-migrate


def cmd_migrate(t: Target, home: Path, state: Path, out: TextIO) -> int:
    """An Airlock-format config -> its native equivalent, shown, then written: in place,
    or for copilot_here's own global file, as our global config (that file stays
    copilot_here's)."""
    if not t.exists:
        print(f"Nothing to migrate: there is no config file ({t.path} does not exist).", file=out)
        return EXIT_OK
    if not t.airlock:
        print(f"Nothing to migrate: {t.path} is already in the native format.", file=out)
        return EXIT_OK
    text = dump(t.config.native)
    parse_config(text, str(t.path))  # the native text means what the Airlock one did
    dest = global_config_path(home) if t.kind == AIRLOCK_GLOBAL else t.path
    print(f"{t.path} is in copilot_here's Airlock format. Its native equivalent:", file=out)
    print("".join(f"    {line}\n" for line in text.splitlines()), end="", file=out)
    if t.config.notes:
        print("Where the native reading allows less than Airlock did:", file=out)
        print("".join(f"  - {n}\n" for n in t.config.notes), end="", file=out)
    if dest.exists() and dest != t.path:
        print(
            f"copilot_here: not written: {dest} exists already (it is used before {t.path}). "
            f"Fix: move it away, or keep it and remove {t.path}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    write_config(dest, text, state, home, out)
    print(
        f"Wrote {dest}"
        + (
            f" (replacing the Airlock text of {t.path})."
            if dest == t.path
            else f"; {t.path} is left to copilot_here."
        ),
        file=out,
    )
    if dest == t.path and t.kind == REPO:
        print(
            "  note: copilot_here's own Airlock reads the native keys differently; use this "
            "file with this CLI.",
            file=out,
        )
    return EXIT_OK
