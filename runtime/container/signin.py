"""The sign-in token in the container: the init takes it out of every environment it
passes on and, with rules enabled, gives the command a placeholder instead.

    the init, at start      take(os.environ): GH_TOKEN / GITHUB_TOKEN / COPILOT_GITHUB_TOKEN
                            removed from the init's environment (so from supervisord's and
                            every service's), kept in memory
    rules enabled           a placeholder of the same shape per token (runtime.core.
                            credentials); the pairs written for the interceptor alone
                            (credentials.json, proxy-user, 0400); the command gets the
                            placeholders under the same names
    otherwise               the command gets the tokens as they came (as copilot_here does)

The host asks for the real token in every state with SECURE_PROXY_SIGNIN=pass-through
(for clients that send it to hosts outside TOKEN_HOSTS).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from runtime import paths
from runtime.core.credentials import TOKEN_VARIABLES, placeholder_for

#: The host's switch (COPILOT_HERE_SIGN_IN=pass-through): the real token to the command.
MODE_VARIABLE = "SECURE_PROXY_SIGNIN"
PASS_THROUGH = "pass-through"


class CredentialsError(Exception):
    """The credentials file is unreadable or not one the init wrote."""


@dataclass
class Tokens:
    """The tokens the container was started with, by variable, out of every environment."""

    by_name: dict[str, str] = field(default_factory=dict)
    pass_through: bool = False  # the host asked for the real token in every state
    placeholders: dict[str, str] = field(default_factory=dict)  # real token -> placeholder

    @property
    def swapped(self) -> bool:
        return bool(self.placeholders)

    def for_command(self) -> dict[str, str]:
        """What the command gets: the placeholders when swapped, else the tokens."""
        return {name: self.placeholders.get(v, v) for name, v in self.by_name.items()}


def take(environ: MutableMapping[str, str]) -> Tokens:
    """Remove the token variables from `environ` (the init's own: os.environ), keep them."""
    found = {}
    for name in TOKEN_VARIABLES:
        value = environ.pop(name, None)
        if value and value.strip():
            found[name] = value.strip()
    pass_through = environ.pop(MODE_VARIABLE, "").strip() == PASS_THROUGH
    return Tokens(found, pass_through)


def swap(tokens: Tokens, owner: tuple[int, int], path: Path | None = None) -> Tokens:
    """Placeholders for the tokens, the pairs written for the interceptor. A token too
    short to stand in for (runtime.core.credentials.MIN_RANDOM) stays as it is."""
    import secrets  # here: hmac and OpenSSL's hashes cost every start ~5 ms, most need none

    for value in dict.fromkeys(tokens.by_name.values()):
        made = placeholder_for(value, secrets.choice)
        if made is not None:
            tokens.placeholders[value] = made
    write(tokens.placeholders, owner, path)
    return tokens


def write(placeholders: dict[str, str], owner: tuple[int, int], path: Path | None = None) -> Path:
    """credentials.json: created fresh (an old one removed), 0400, owned by `owner`
    (proxy-user) before the token is written into it."""
    path = path or paths.credentials_file()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    pairs = [{"placeholder": ph, "token": real} for real, ph in placeholders.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, 0o400)
        os.write(fd, (json.dumps({"pairs": pairs}) + "\n").encode())
    finally:
        os.close(fd)
    return path


def read(path: Path) -> dict[str, str]:
    """placeholder -> real token, from credentials.json; {} when there is none (no
    token, or rules disabled). CredentialsError when it is there but unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        pairs = json.loads(text)["pairs"]
        out = {str(p["placeholder"]): str(p["token"]) for p in pairs}
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"{path} is not a credentials file the init wrote") from None
    if any(not ph or not real or ph == real for ph, real in out.items()):
        raise CredentialsError(f"{path} has an empty or unswapped pair")
    return out
