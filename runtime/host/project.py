"""Which directory is the project (mounted at /work, holding the repo config).

Run from a subdirectory of a git repository, the project is the repository's root,
found as git finds it: the nearest directory upwards holding `.git` (a directory, or
a file for worktrees and submodules). The search stops below the home directory
(a dotfiles repository in ~ does not make the whole home the project) and below /.
Outside a repository the project is the current directory. The home directory
itself, or a directory above it (/ included), is never a project: the container
would see (and write) everything in it.
"""

from __future__ import annotations

import os
from pathlib import Path


class ProjectError(Exception):
    """The directory cannot be the project; the message says where to run instead."""


def find_project(cwd: Path, home: Path) -> Path:
    cwd = cwd.resolve()
    home = home.resolve()
    stop = home if (cwd == home or home in cwd.parents) else Path(cwd.anchor)
    for directory in (cwd, *cwd.parents):
        if directory == stop:
            break
        if os.path.lexists(directory / ".git"):
            return directory
    return cwd


def check_project(project: Path, home: Path) -> Path:
    home = home.resolve()
    if project == home:
        raise ProjectError(
            f"refusing to use your home directory {home} as the project: the container would "
            "see and write all of it. Fix: run copilot_here from a project directory (for the "
            "global config use the --network-*-global options)"
        )
    if project in home.parents:
        raise ProjectError(
            f"refusing to use {project} as the project: it holds your home directory "
            f"{home}, which the container would see and write. Fix: run copilot_here from "
            "a project directory"
        )
    return project
