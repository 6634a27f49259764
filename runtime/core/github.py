"""The project's GitHub repository: from its origin remote's URL to the values of the
built-in rules' {{GITHUB_OWNER}}/{{GITHUB_REPO}} placeholders. Pure.

The forms git itself writes for github.com:

    https://github.com/OWNER/REPO(.git)     (also http://, with user info or a port)
    git@github.com:OWNER/REPO(.git)         (scp-like ssh)
    ssh://git@github.com(:22)/OWNER/REPO(.git)

Anything else (another host, a local path, a query, more or fewer path segments,
characters GitHub does not allow in a name) is no GitHub repository: the rules that
name it drop out, never widened.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from runtime.core.placeholders import placeholder_values

GITHUB_HOST = "github.com"
SCHEMES = ("https", "http", "ssh", "git", "git+ssh", "ssh+git")
# git's scp-like syntax: [user@]host:path, with no '/' before the ':'.
_SCP = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+):(?P<path>.*)")


def parse_remote(url: str) -> tuple[str, str] | None:
    """(owner, repo) of a github.com remote URL, None for anything else."""
    url = url.strip()
    if "://" in url:
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            return None
        if parts.scheme.lower() not in SCHEMES or parts.query or parts.fragment:
            return None
        path = parts.path
    else:
        scp = _SCP.fullmatch(url)
        if scp is None:
            return None
        host, path = scp["host"].lower(), scp["path"]
    if host != GITHUB_HOST:
        return None
    segments = path.strip("/").split("/")
    if len(segments) != 2 or path.startswith("//"):
        return None
    owner, repo = segments[0], segments[1].removesuffix(".git")
    values = placeholder_values(owner, repo)
    if set(values) != {"GITHUB_OWNER", "GITHUB_REPO"}:
        return None
    return owner, repo


def redact(url: str) -> str:
    """The URL without its user info (an https remote may carry a token)."""
    if "://" not in url:
        return url.strip()
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "(an unparsable URL)"
    if "@" not in parts.netloc:
        return url.strip()
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def repository_values(repository: str | None) -> dict[str, str]:
    """Placeholder values from "OWNER/REPO" (as passed to the container); {} when unusable."""
    if not repository or repository.count("/") != 1:
        return {}
    owner, repo = repository.split("/")
    values = placeholder_values(owner, repo)
    return values if len(values) == 2 else {}


def repository_of(values: Mapping[str, str]) -> str | None:
    """ "OWNER/REPO" of filled placeholder values, None when either is missing."""
    owner, repo = values.get("GITHUB_OWNER"), values.get("GITHUB_REPO")
    return f"{owner}/{repo}" if owner and repo else None
