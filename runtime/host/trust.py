"""Trust on first use for network configs: a config decides the next run only once
the user has approved its exact content.

Why: the project is mounted at /work and a cloned repository can ship
`.copilot_here/network.json`, so neither the agent nor a repository author may be
able to choose the policy of a later run. A repo config takes effect only when its
sha256 matches the approval recorded on the host, outside anything a container sees:

    <state root>/approvals/<path_key(config path)>.json
        {"path": ..., "sha256": ..., "content": ..., "approved_at": ...}

The global config (`~/.copilot_here/network.json`) is the user's own: with no
approval record it is trusted. It gets a record when the CLI writes it or when a
run mounts it writable (`--network-config-write`); from then on it must match,
so an edit the agent made during such a run reaches a later run only after the
user approved it. A config that was approved and is now gone is a change too
(it would hand the next run to the global config or to the allow-all defaults).

What is hashed is what the container reads: the config must be a regular file
in a real directory (a symlink is resolved inside the container, against other
files than the ones on the host).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import stat
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from loguru import logger

from runtime import fsutil
from runtime.host.fileproblems import describe
from runtime.host.hoststate import ensure_private_dir, path_key
from runtime.resolve import GLOBAL, REPO, global_config_path, repo_config_path

TRUST_COMMAND = "copilot_here --network-trust"
APPROVALS = "approvals"
EMPTY = "empty"

TRUSTED, ABSENT, NEW, CHANGED, REMOVED = "trusted", "absent", "new", "changed", "removed"
NAMES = {REPO: "repo config", GLOBAL: "global config"}


class TrustError(Exception):
    """A config file that cannot be checked (symlink, not a regular file, unreadable)."""


@dataclass(frozen=True)
class Approval:
    path: str
    sha256: str
    content: str
    approved_at: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Check:
    """One config file against its approval record."""

    kind: str  # REPO or GLOBAL
    path: Path
    state: str  # TRUSTED, ABSENT, NEW, CHANGED or REMOVED
    current: bytes | None
    approval: Approval | None

    @property
    def trusted(self) -> bool:
        return self.state in (TRUSTED, ABSENT)

    @property
    def name(self) -> str:
        return f"the {NAMES[self.kind]} {self.path}"

    @property
    def text(self) -> str:
        return decode(self.current) if self.current is not None else ""

    def headline(self) -> str:
        if self.state == NEW:
            return f"{self.name} is new: it has never been approved"
        if self.state == CHANGED:
            when = self.approval.approved_at if self.approval else "?"
            return f"{self.name} changed since you approved it ({when})"
        if self.state == REMOVED:
            instead = (
                "the global config or the built-in defaults apply"
                if self.kind == REPO
                else "the built-in defaults (allow-all) apply"
            )
            return f"{self.name} was approved but has been removed (without it {instead})"
        return f"{self.name} is trusted"

    def body(self) -> str:
        """The content (new), the diff from the approved version (changed), or nothing."""
        if self.state == NEW:
            return "Its content:\n" + indent(self.text)
        if self.state in (CHANGED, REMOVED) and self.approval is not None:
            return "Changes since the approved version:\n" + unified_diff(
                self.approval.content, self.text, self.path, self.approval.approved_at
            )
        return ""


# ----------------------------------------------------------------------------- text


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def visible(text: str) -> str:
    """Control and format characters shown escaped: a config shown for approval must
    not be able to move the cursor, clear lines or reorder text (bidi overrides) and
    so hide what the user approves."""
    out = []
    for ch in text:
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Co", "Cs"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def indent(text: str) -> str:
    lines = visible(text).splitlines() or ["(empty file)"]
    return "".join(f"    {line}\n" for line in lines)


def unified_diff(old: str, new: str, path: Path, approved_at: str) -> str:
    lines = difflib.unified_diff(
        visible(old).splitlines(),
        visible(new).splitlines(),
        fromfile=f"{path} (approved {approved_at})",
        tofile=f"{path} (now)",
        lineterm="",
    )
    return "".join(f"{line}\n" for line in lines) or "(no difference in the text)\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- files


def read_current(path: Path, follow: bool = False) -> bytes | None:
    """The config's bytes, None when it does not exist. Never opens anything but a
    regular file (a FIFO would hang the CLI). A symlink is followed only with `follow`
    (the global config: the user's dotfiles), never for a repo config."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise TrustError(
                f"{path} is a symlink to {os.readlink(path)}, which does not exist. Fix: "
                "restore the file it points to, or remove the link"
            ) from None
        return None
    except OSError as exc:
        if not follow and os.path.islink(path):
            raise TrustError(
                f"{path} is a symlink; a container resolves it inside itself, so it would "
                "not read what you approve. Fix: replace the link with the file itself"
            ) from None
        raise TrustError(describe(path, exc)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise TrustError(f"{path} is a directory, not a file. Fix: move that directory away")
        if not stat.S_ISREG(st.st_mode):
            raise TrustError(f"{path} is not a regular file. Fix: make it a JSON file")
        chunks = []
        try:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except OSError as exc:
            raise TrustError(describe(path, exc)) from None
        return b"".join(chunks)
    finally:
        os.close(fd)


def config_dir_check(path: Path) -> None:
    """A repo config's directory must be a real directory of the project (the
    container resolves a symlinked one inside itself)."""
    if path.parent.is_symlink():
        raise TrustError(
            f"{path.parent} is a symlink; a container resolves it inside itself. Fix: make "
            "it a real directory in the project"
        )


def record_path(root: Path, config: Path) -> Path:
    return root / APPROVALS / f"{path_key(Path(os.path.abspath(config)))}.json"


def load_approval(root: Path, config: Path) -> Approval | None:
    directory = root / APPROVALS
    if not os.path.lexists(directory):
        return None
    ensure_private_dir(directory, root)  # refuses a planted symlink or foreign directory
    record = record_path(root, config)
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _unreadable(config, record, exc.strerror or str(exc))
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read()
    try:
        data = json.loads(raw)
        approval = Approval(
            str(data["path"]), str(data["sha256"]), str(data["content"]), str(data["approved_at"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        return _unreadable(config, record, str(exc))
    if approval.path != os.path.abspath(config):
        return _unreadable(config, record, f"it is for {approval.path}")
    return approval


def _unreadable(config: Path, record: Path, why: str) -> Approval:
    # A damaged record approves nothing, but still counts as a record (a global
    # config with a record must match it).
    logger.warning(
        "approval record {} is unusable ({}); treating {} as changed", record, why, config
    )
    return Approval(str(config), "", "", f"unknown: record {record} is unusable ({why})")


def ready(root: Path) -> Path:
    """The approvals directory, created now: a CLI write checks it can record its
    approval before it changes the config (StateError naming the fix otherwise)."""
    return ensure_private_dir(root / APPROVALS, root)


def approve(root: Path, config: Path, data: bytes | None) -> Approval | None:
    """Record `data` as the approved content of `config` (None: approve its absence,
    i.e. forget the record). Atomic: a reader sees the old record or the new one."""
    directory = ensure_private_dir(root / APPROVALS, root)
    record = directory / record_path(root, config).name
    if data is None:
        record.unlink(missing_ok=True)
        return None
    approval = Approval(
        os.path.abspath(config),
        sha256(data),
        decode(data),
        datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    fsutil.atomic_write(record, approval.to_json(), 0o600)
    return approval


def check(root: Path, kind: str, path: Path) -> Check:
    if kind == REPO:
        config_dir_check(path)
    current = read_current(path, follow=kind == GLOBAL)
    approval = load_approval(root, path)
    if current is None:
        state = REMOVED if approval is not None else ABSENT
    elif approval is None:
        state = TRUSTED if kind == GLOBAL else NEW
    elif approval.sha256 == sha256(current):
        state = TRUSTED
    else:
        state = CHANGED
    return Check(kind, path, state, current, approval)


def in_use(root: Path, project: Path, home: Path) -> list[Check]:
    """The checks that decide a run: the repo config; when there is none, the
    global config too (it is then the one in force)."""
    repo = check(root, REPO, repo_config_path(project))
    if repo.current is not None:
        return [repo]
    return [repo, check(root, GLOBAL, global_config_path(home))]


def pending(root: Path, project: Path, home: Path) -> list[Check]:
    return [c for c in in_use(root, project, home) if not c.trusted]


# ----------------------------------------------------------------------------- the gate


def refusal(checks: list[Check]) -> str:
    parts = []
    for c in checks:
        parts.append(f"copilot_here: not starting the container: {c.headline()}.\n")
        parts.append(c.body())
    parts.append(
        "A network config decides what the agent may reach; it takes effect only once you "
        f"have approved its exact content.\nReview it, then approve it with: {TRUST_COMMAND}\n"
    )
    return "".join(parts)


def gate(
    root: Path,
    project: Path,
    home: Path,
    interactive: bool,
    err: IO[str] | None = None,
    ask: Callable[[str], str] | None = None,
) -> bool:
    """True when the run may start. Otherwise one message names the file, shows the
    content or the diff and the command to approve it; on a terminal the user may
    approve right here (default no)."""
    err = err or sys.stderr
    checks = pending(root, project, home)
    if not checks:
        return True
    if not interactive:
        print(refusal(checks), end="", file=err)
        return False
    for c in checks:
        print(f"copilot_here: {c.headline()}.\n{c.body()}", end="", file=err)
    answer = (ask or _ask_on(err))("Trust this config? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print(f"Not approved; the container was not started. Later: {TRUST_COMMAND}", file=err)
        return False
    for c in checks:  # exactly the bytes shown, not a re-read
        approve(root, c.path, c.current)
    return True


def _ask_on(err: IO[str]) -> Callable[[str], str]:
    def ask(prompt: str) -> str:
        # The prompt goes to stderr: stdout belongs to the command.
        print(prompt, end="", file=err, flush=True)
        return sys.stdin.readline()  # "" at end of input: no

    return ask


# ----------------------------------------------------------------------------- writable runs


def before_writable_run(root: Path, kind: str, path: Path) -> Check:
    """A run that mounts the config writable: record its content now (if not yet
    recorded), so that what the agent changes is seen at exit and by the next run."""
    c = check(root, kind, path)
    if c.approval is None and c.current is not None:
        approve(root, path, c.current)
        c = check(root, kind, path)
    return c


def after_writable_run(root: Path, kind: str, path: Path) -> str:
    """What changed in the config during a writable run ('' when nothing did)."""
    try:
        c = check(root, kind, path)
    except TrustError as exc:
        return f"copilot_here: after this run: {exc}\n"
    if c.trusted:
        return ""
    if c.state == REMOVED:
        what = "was removed during this run (it was writable with --network-config-write)"
    else:
        what = (
            "was changed during this run (it was writable with --network-config-write); "
            "the change was in force for this run only"
        )
    return (
        f"copilot_here: {c.name} {what}.\n"
        + c.body()
        + f"Later runs use it only after you approve it: {TRUST_COMMAND}\n"
    )


# ----------------------------------------------------------------------------- empty mount


def empty_dir(root: Path) -> Path:
    """The read-only directory mounted at /work/.copilot_here when the project has no
    repo config: it hides whatever is there and lets nothing be planted during the
    run. Kept empty (the host user could drop something in it)."""
    path = ensure_private_dir(root / EMPTY, root)
    os.chmod(path, 0o755)  # appuser may list it: "no config here", not "permission denied"
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    return path
