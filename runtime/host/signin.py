"""Signing the Copilot CLI in from the host, as copilot_here does, without the token
ever being in an argv, a dry run's output or a log.

Where the token comes from, first found:

    GH_TOKEN, GITHUB_TOKEN     the host environment
    gh auth token              when gh is installed and signed in; its scopes are checked
                               with `gh auth status`: `copilot` is needed, and a token
                               with admin scopes is used only when you say so on a terminal
    none                       copilot asks you to /login (its own sign-in, kept in
                               ~/.copilot: runtime.host.copilotstate)

COPILOT_HERE_SIGN_IN: `none` passes no token; `pass-through` gives the agent the real
token even with rules enabled (for tools that send it to hosts other than GitHub's and
Copilot's, see runtime.core.credentials.TOKEN_HOSTS).

The token goes to the container as GH_TOKEN and GITHUB_TOKEN BY NAME: `-e GH_TOKEN`
in the engine's argv, the value in the engine's environment (the sandbox: in its
launcher's environment, never in its spec). With rules enabled the init swaps it for
a placeholder (runtime.container.signin).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runtime.core.policy import Mode
from runtime.resolve import resolve

SWITCH = "COPILOT_HERE_SIGN_IN"
AUTO, NONE, PASS_THROUGH = "auto", "none", "pass-through"
#: The names the container gets the token under (what copilot_here passes).
PASSED_AS = ("GH_TOKEN", "GITHUB_TOKEN")
#: The host variables a token is taken from, in gh's own order.
FROM_ENVIRONMENT = ("GH_TOKEN", "GITHUB_TOKEN")
#: The init's switch for the real token (runtime.container.signin.MODE_VARIABLE).
CONTAINER_SWITCH = "SECURE_PROXY_SIGNIN"
REQUIRED_SCOPE = "copilot"
GH_TIMEOUT = 15.0
REFRESH = "gh auth refresh -h github.com -s copilot"

_SCOPES_LINE = re.compile(r"Token scopes:\s*(.*)")


class SignInError(Exception):
    """No run: the token found cannot be used; the message says why and the fix."""


@dataclass(frozen=True)
class SignIn:
    source: str  # "GH_TOKEN from the host environment", "gh auth token", "" (none)
    token: str | None = field(default=None, repr=False)
    pass_through: bool = False
    why_none: str = ""

    def names(self) -> list[str]:
        """The variables passed by name (`-e NAME`)."""
        return list(PASSED_AS) if self.token else []

    def values(self) -> dict[str, str]:
        """The values, for the engine's environment only."""
        return dict.fromkeys(PASSED_AS, self.token) if self.token else {}

    def container_env(self) -> dict[str, str]:
        return {CONTAINER_SWITCH: PASS_THROUGH} if self.token and self.pass_through else {}

    def line(self, rules_enabled: bool) -> str:
        if not self.token:
            return f"[Network] Sign-in: none{self.why_none}: copilot will ask you to /login"
        if self.pass_through:
            what = f"{SWITCH}={PASS_THROUGH}: the agent gets the token itself"
        elif rules_enabled:
            what = "the agent sees a placeholder"
        else:
            what = "rules disabled: the agent gets the token itself"
        return f"[Network] Sign-in: {self.source} ({what})"


def find(
    environ: Mapping[str, str],
    interactive: bool,
    ask: Callable[[str], bool] | None = None,
    gh: str | None = None,
) -> SignIn:
    """The token for this run (SignInError when gh's cannot be used)."""
    switch = environ.get(SWITCH, "").strip().lower() or AUTO
    if switch not in (AUTO, NONE, PASS_THROUGH):
        raise SignInError(
            f"{SWITCH}={environ[SWITCH]!r}: unknown. Fix: unset it, or set it to "
            f"{NONE} (no token) or {PASS_THROUGH} (the agent gets the real token)"
        )
    if switch == NONE:
        return SignIn("", why_none=f" ({SWITCH}={NONE})")
    through = switch == PASS_THROUGH
    for name in FROM_ENVIRONMENT:
        value = environ.get(name, "").strip()
        if value:
            return SignIn(f"{name} from the host environment", value, through)
    gh = gh or on_path("gh", environ.get("PATH", ""))
    if not gh:
        return SignIn("")
    token = from_gh(gh, interactive, ask or ask_on_terminal)
    return SignIn("from gh auth token", token, through) if token else SignIn("")


def on_path(name: str, path: str) -> str | None:
    """The program `name` in the directories of `path`, as a shell finds it."""
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _gh(gh: str, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [gh, *args],
            capture_output=True,
            text=True,
            timeout=GH_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def scopes_of(status: str) -> set[str] | None:
    """The scopes `gh auth status` lists ("Token scopes: 'a', 'b'"); None when it lists
    none (a fine-grained token has permissions, not scopes)."""
    found: set[str] | None = None
    for match in _SCOPES_LINE.finditer(status):
        found = (found or set()) | set(re.findall(r"'([^']+)'", match.group(1)))
    return found


def privileged(scope: str) -> bool:
    """Scopes that administer an organisation, an enterprise, keys, hooks or runners, or
    delete repositories and packages (copilot_here asks before using such a token)."""
    return (
        scope.startswith(("admin:", "manage_"))
        or scope in {"delete_repo", "write:public_key", "write:packages", "delete:packages"}
        or scope == "site_admin"
    )


def from_gh(gh: str, interactive: bool, ask: Callable[[str], bool]) -> str | None:
    """`gh auth token`, once its scopes pass (None when gh is not signed in)."""
    got = _gh(gh, "auth", "token")
    token = got.stdout.strip() if got is not None and got.returncode == 0 else ""
    if not token:
        return None
    status = _gh(gh, "auth", "status", "--active", "--hostname", "github.com")
    if status is not None and "unknown flag" in status.stderr:  # gh before 2.40
        status = _gh(gh, "auth", "status", "--hostname", "github.com")
    text = "" if status is None else status.stdout + status.stderr
    scopes = scopes_of(text)
    if scopes is None:
        return token  # no scopes to check (a fine-grained token, or gh cannot say)
    if REQUIRED_SCOPE not in scopes:
        raise SignInError(
            f"the token from gh auth token lacks the '{REQUIRED_SCOPE}' scope (it has: "
            f"{', '.join(sorted(scopes)) or 'none'}). Fix: {REFRESH} (or set GH_TOKEN, or "
            f"{SWITCH}={NONE} to sign in with /login inside)"
        )
    admin = sorted(s for s in scopes if privileged(s))
    if not admin:
        return token
    question = (
        f"The token from gh auth token has highly privileged scopes ({', '.join(admin)}); "
        "every request the agent makes to GitHub through the guard would carry it. "
        "Use it anyway? [y/N] "
    )
    if interactive and ask(question):
        return token
    raise SignInError(
        f"not using the token from gh auth token: it has admin scopes ({', '.join(admin)}). "
        f"Fix: gh auth refresh -h github.com --remove-scopes {','.join(admin)}, or set "
        f"GH_TOKEN to a token without them, or {SWITCH}={NONE}"
        + ("" if interactive else " (on a terminal you are asked instead)")
    )


def ask_on_terminal(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, KeyboardInterrupt):
        return False
    return answer.strip().lower() in ("y", "yes")


def rules_enabled(project: Path, home: Path) -> bool:
    """Whether the init gives the agent a placeholder: rules enabled (the same
    resolution as the init's)."""
    return resolve(project, home).policy.mode is not Mode.ALLOW_ALL


def announce(found: SignIn, project: Path, home: Path) -> None:
    """The one line on stderr saying where the token came from, as the run starts (after
    every check that could stop it: a file problem stays one line)."""
    print(found.line(rules_enabled(project, home)), file=sys.stderr)
