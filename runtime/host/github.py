"""The project's GitHub repository on the host: read from its origin remote, approved
like a config, passed to the container as SECURE_PROXY_GITHUB_REPO=OWNER/REPO.

The built-in rules allow git push and API writes only to the project's own repository
({{GITHUB_OWNER}}/{{GITHUB_REPO}}). The project, and its `.git/config` with it, is
writable by the agent: an agent that set `origin` to its own repository during one
run would have the next run allow pushes there. So the repository is recorded with
the approvals, outside anything a container sees:

    <state root>/approvals/<path_key(project)>.github.json
        {"project": ..., "repository": "OWNER/REPO" or null, "url": ..., "approved_at": ...}

- The first run of copilot_here in a project records what its origin names (or that
  it names none): before any agent of ours ran in it, the origin is the user's clone.
- A later run whose origin names another repository than the recorded one does not
  start while a rule in force names the repository, until the user approves the
  change (`copilot_here --network-trust`, or "y" at the prompt on a terminal).
  Approving "none" counts: an origin added later is a change.
- An origin that names no repository now (removed, or not GitHub) only narrows: the
  rules naming it drop out, and the record is kept.

The URL is read with `git config --get remote.origin.url` run in the project root
(git handles worktrees, submodules, includes and quoting); no GIT_* variable of the
caller's shell applies, and git never looks above the project. git runs no hook or
configured command for `config --get`, so the project is read even when another user
owns it (safe.directory=* for this one command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from loguru import logger

from runtime import fsutil
from runtime.core.github import parse_remote, redact, repository_values
from runtime.host.hoststate import ensure_private_dir, path_key
from runtime.host.trust import APPROVALS, TRUST_COMMAND, visible

RECORD_SUFFIX = ".github.json"
ORIGIN_KEY = "remote.origin.url"
# A project owned by another user (git's "dubious ownership") is still read: git guards
# commands a repository's config could make it run, and `config --get` runs none.
SAFE = ("-c", "safe.directory=*")
GIT_TIMEOUT = 10.0
NEW, TRUSTED, CHANGED, NARROWED = "new", "trusted", "changed", "narrowed"


@dataclass(frozen=True)
class Remote:
    """What the project's origin names: a URL (without user info) and OWNER/REPO."""

    url: str | None
    repository: str | None
    why: str = ""  # why there is no repository ("" when there is one)

    def describe(self) -> str:
        if self.repository:
            return f"{self.repository} (origin {visible(self.url or '')})"
        return f"none ({self.why})"


@dataclass(frozen=True)
class Approved:
    repository: str | None
    url: str | None
    approved_at: str


@dataclass(frozen=True)
class RepoCheck:
    project: Path
    current: Remote
    approval: Approved | None

    @property
    def state(self) -> str:
        if self.approval is None:
            return NEW
        if self.current.repository == self.approval.repository:
            return TRUSTED
        return NARROWED if self.current.repository is None else CHANGED

    @property
    def values(self) -> dict[str, str]:
        """The placeholder values a run may use: none while a change waits for approval."""
        return {} if self.state == CHANGED else repository_values(self.current.repository)

    def headline(self) -> str:
        was = self.approval.repository if self.approval else None
        when = self.approval.approved_at if self.approval else "?"
        return (
            f"the project's GitHub repository changed since you approved it ({when}): "
            f"it was {was or 'none'}, its origin remote now names "
            f"{self.current.describe()}"
        )


# ----------------------------------------------------------------------------- reading


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def read_remote(project: Path) -> Remote:
    """The project's origin remote, as git reads it."""
    if not os.path.lexists(project / ".git"):
        return Remote(None, None, "the project is not a git repository")
    git = shutil.which("git")
    if git is None:
        return Remote(None, None, "git is not installed on this host")
    env = _git_env()
    env["GIT_CEILING_DIRECTORIES"] = str(project.parent)  # never a repository above
    try:
        result = subprocess.run(
            [git, "--no-pager", "-C", str(project), *SAFE, "config", "--get", ORIGIN_KEY],
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Remote(None, None, f"git could not be run: {exc}")
    if result.returncode == 1:
        return Remote(None, None, "the project has no origin remote")
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["?"])[0]
        return Remote(None, None, f"git could not read it: {visible(first)}")
    url = result.stdout.strip()
    parsed = parse_remote(url)
    if parsed is None:
        shown = visible(redact(url))
        return Remote(redact(url), None, f"origin {shown} is no github.com repository")
    return Remote(redact(url), f"{parsed[0]}/{parsed[1]}")


# ----------------------------------------------------------------------------- the record


def record_path(root: Path, project: Path) -> Path:
    return root / APPROVALS / f"{path_key(Path(os.path.abspath(project)))}{RECORD_SUFFIX}"


def load(root: Path, project: Path) -> Approved | None:
    directory = root / APPROVALS
    if not os.path.lexists(directory):
        return None
    ensure_private_dir(directory, root)
    try:
        fd = os.open(record_path(root, project), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _unusable(project, exc.strerror or str(exc))
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read()
    try:
        data = json.loads(raw)
        if data["project"] != os.path.abspath(project):
            return _unusable(project, f"it is for {data['project']}")
        repository = data["repository"]
        if repository is not None and not repository_values(str(repository)):
            return _unusable(project, f"{repository!r} is no repository")
        return Approved(repository, data.get("url"), str(data["approved_at"]))
    except (ValueError, KeyError, TypeError) as exc:
        return _unusable(project, str(exc))


def _unusable(project: Path, why: str) -> Approved:
    # A damaged record approves no repository at all: any repository is then a change.
    logger.warning("the GitHub repository record of {} is unusable ({})", project, why)
    return Approved(None, None, f"unknown: the record is unusable ({why})")


def approve(root: Path, project: Path, remote: Remote) -> None:
    directory = ensure_private_dir(root / APPROVALS, root)
    data = {
        "project": os.path.abspath(project),
        "repository": remote.repository,
        "url": remote.url,
        "approved_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    target = directory / record_path(root, project).name
    fsutil.atomic_write(target, json.dumps(data, indent=1) + "\n", 0o600)


def check(root: Path, project: Path) -> RepoCheck:
    return RepoCheck(project, read_remote(project), load(root, project))


# ----------------------------------------------------------------------------- the gate


def gate(
    root: Path,
    project: Path,
    relevant: bool,
    interactive: bool,
    record: bool = True,
    err: IO[str] | None = None,
    ask: Callable[[str], str] | None = None,
) -> dict[str, str] | None:
    """The placeholder values for this run, or None when it must not start.

    `relevant`: a rule in force names the repository (only then can a change matter:
    it is refused then, and the values are withheld otherwise). `record`: the first
    run records the repository (not a dry run)."""
    err = err or sys.stderr
    c = check(root, project)
    if c.state == NEW:
        if record:
            approve(root, project, c.current)
            if c.current.repository and relevant:
                print(
                    f"copilot_here: recorded the project's GitHub repository "
                    f"{c.current.describe()}: the built-in rules allow git push and API "
                    f"writes there only; a change of origin needs your approval "
                    f"({TRUST_COMMAND})",
                    file=err,
                )
        return c.values
    if c.state != CHANGED or not relevant:
        return c.values
    if not interactive:
        print(refusal(c), end="", file=err)
        return None
    print(f"copilot_here: {c.headline()}.", file=err)
    answer = (ask or _ask(err))(f"Allow git push and API writes to {c.current.repository}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print(f"Not approved; the container was not started. Later: {TRUST_COMMAND}", file=err)
        return None
    approve(root, project, c.current)  # the remote shown, not a re-read
    return repository_values(c.current.repository)


def refusal(c: RepoCheck) -> str:
    return (
        f"copilot_here: not starting the container: {c.headline()}.\n"
        "The built-in rules allow git push and API writes only to the project's own "
        "repository, and the project (its .git/config too) is writable by the agent, so a "
        "new origin takes effect only once you approve it.\n"
        f"Check `git remote -v`, then approve it with: {TRUST_COMMAND}\n"
    )


def _ask(err: IO[str]) -> Callable[[str], str]:
    def ask(prompt: str) -> str:
        print(prompt, end="", file=err, flush=True)
        return sys.stdin.readline()

    return ask


# ----------------------------------------------------------------------------- the CLI


def show_lines(root: Path, project: Path) -> list[str]:
    """--network-show: where {{GITHUB_OWNER}}/{{GITHUB_REPO}} come from, and their state."""
    c = check(root, project)
    if c.state == CHANGED:
        return [
            f"GitHub repository: NOT APPROVED: {c.headline()}. Runs whose rules name it "
            f"refuse to start until you approve it: {TRUST_COMMAND}"
        ]
    if c.current.repository is None:
        line = f"GitHub repository: {c.current.describe()}: rules naming it are left out"
    else:
        owner, repo = c.current.repository.split("/")
        line = (
            f"GitHub repository: {c.current.repository} ({{{{GITHUB_OWNER}}}}={owner}, "
            f"{{{{GITHUB_REPO}}}}={repo}), from the origin remote {visible(c.current.url or '')} "
            f"of {project}"
        )
    if c.state == TRUSTED and c.approval is not None:
        line += f"; approved {c.approval.approved_at}"
    elif c.state == NEW:
        line += "; recorded at the next run"
    elif c.state == NARROWED and c.approval is not None:
        line += f" (the approved one, {c.approval.repository}, is kept for a later run)"
    return [line]


def trust_pending(root: Path, project: Path, out: IO[str]) -> bool:
    """--network-trust: show and approve a changed repository. True when there was one."""
    c = check(root, project)
    if c.state != CHANGED:
        return False
    print(f"{c.headline()[0].upper()}{c.headline()[1:]}.", file=out)
    approve(root, project, c.current)
    print(
        f"Approved: git push and API writes to {c.current.repository} (the built-in rules).",
        file=out,
    )
    return True
