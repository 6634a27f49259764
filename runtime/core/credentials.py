"""The sign-in token's stand-in: its shape, where the real token may go, and the swap.

With rules enabled the agent never holds the real GitHub token: the init gives it a
placeholder of the same shape (`placeholder_for`), and the interceptor, which alone
holds the real one, puts it back into the `Authorization` header of requests to
TOKEN_HOSTS (`swap_authorization`). A request that carries a placeholder to any
other host is refused (`carries_placeholder`; reason `credential_leak`).

Pure: strings in, strings out. The randomness is the caller's (`choice`).
"""

from __future__ import annotations

import base64
import binascii
import string
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence

#: The hosts the real token is sent to, and no other: GitHub's web and API hosts and
#: Copilot's. `*.` covers any subdomain (api.individual.githubcopilot.com, ...).
TOKEN_HOSTS: tuple[str, ...] = (
    "github.com",
    "api.github.com",
    "copilot-proxy.githubusercontent.com",
    "*.githubcopilot.com",
)

#: The environment variables a token arrives in (the Copilot CLI reads them in this
#: order), and that the agent gets placeholders in.
TOKEN_VARIABLES: tuple[str, ...] = ("COPILOT_GITHUB_TOKEN", "GH_TOKEN", "GITHUB_TOKEN")

#: GitHub's token prefixes (classic PAT, OAuth, user-to-server, server-to-server,
#: refresh, fine-grained PAT): kept in the placeholder, so clients that look at the
#: kind of token (the Copilot CLI refuses classic PATs) see the same kind.
KNOWN_PREFIXES: tuple[str, ...] = ("github_pat_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")

#: Below this many random characters a placeholder could turn up by chance in other
#: text (a false credential_leak) and a guess could hit it: such a token is passed as is.
MIN_RANDOM = 16

_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits)


def is_token_host(host: str) -> bool:
    """Whether `host` (normalised: lower case, no trailing dot) may get the real token."""
    for pattern in TOKEN_HOSTS:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):  # a subdomain, never the bare name
                return True
        elif host == pattern:
            return True
    return False


def prefix_of(token: str) -> str:
    return next((p for p in KNOWN_PREFIXES if token.startswith(p)), "")


def placeholder_for(token: str, choice: Callable[[str], str]) -> str | None:
    """A stand-in of the same shape: the prefix kept, every other letter or digit
    replaced by a random one of its class (lower, upper, digit), other characters
    (`_` in fine-grained PATs) kept; the same length. None when the token has too few
    random characters to stand in for safely (then the caller passes it unchanged).
    `choice` picks one character from a string (secrets.choice)."""
    prefix = prefix_of(token)
    rest = token[len(prefix) :]
    if sum(ch.isascii() and ch.isalnum() for ch in rest) < MIN_RANDOM:
        return None
    while True:
        out = []
        for ch in rest:
            pool = next((c for c in _CLASSES if ch in c), None)
            out.append(choice(pool) if pool else ch)
        made = prefix + "".join(out)
        if made != token:
            return made


# ----------------------------------------------------------------------------- the swap


def swap_authorization(value: str, real_of: Mapping[str, str]) -> str | None:
    """The `Authorization` value with a placeholder replaced by its real token, or None
    when it carries none in a form this swaps: `token P`, `Bearer P` (any case), and
    `Basic base64(user:P)` or `base64(P:x)` (git's `x-access-token:TOKEN`)."""
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    kind = scheme.lower()
    if kind in ("token", "bearer") and credentials in real_of:
        return f"{scheme} {real_of[credentials]}"
    if kind == "basic":
        decoded = _basic(credentials)
        if decoded is None:
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        if password in real_of:
            password = real_of[password]
        elif user in real_of:
            user = real_of[user]
        else:
            return None
        pair = f"{user}:{password}".encode()
        return f"{scheme} {base64.b64encode(pair).decode('ascii')}"
    return None


def _basic(credentials: str) -> str | None:
    try:
        return base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def carries_placeholder(
    placeholders: Iterable[str],
    headers: Sequence[tuple[str, str]],
    url_parts: Sequence[str],
) -> str | None:
    """Where a request carries a placeholder (a header's name, or "url"), else None.

    Header values are read as sent and, for Basic credentials, decoded; the URL parts
    (path with query, Host, authority) as sent and percent-decoded."""
    wanted = [p for p in placeholders if p]
    if not wanted:
        return None

    def found(text: str) -> bool:
        return any(p in text for p in wanted)

    for name, value in headers:
        if found(value) or found(name):
            return name
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "basic":
            decoded = _basic(credentials.strip())
            if decoded is not None and found(decoded):
                return name
    for part in url_parts:
        if part and (found(part) or found(_unquote_fully(part))):
            return "url"
    return None


def _unquote_fully(text: str, rounds: int = 3) -> str:
    """Percent-decoded until it stops changing (a few rounds: %2547 is %47 is G)."""
    for _ in range(rounds):
        decoded = urllib.parse.unquote(text)
        if decoded == text:
            break
        text = decoded
    return text
