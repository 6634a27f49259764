"""Paths as the policy compares them: normalisation, every reading an upstream may
take, and `allowed_paths` entries. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalize_path_escapes(path: str) -> str:
    """Decode percent-encoded unreserved characters; upper-case the other escapes."""
    return _PERCENT.sub(_decode_unreserved, path)


def _resolve(path: str, params: bool = True) -> str:
    """Dot segments resolved and empty segments dropped, on text already decoded.

    `params`: `..;x` is `..`, as servlet containers strip path parameters; without,
    it is a name, as nginx and Node read it.
    """
    out: list[str] = []
    segments = path.split("/")
    for segment in segments:
        if not segment:
            continue
        if segment[0] == ".":  # only these can be dot segments
            name = segment.split(";", 1)[0] if params else segment
            if name == ".":
                continue
            if name == "..":
                if out:
                    out.pop()
                continue
        out.append(segment)
    normalized = "/" + "/".join(out)
    last = segments[-1]
    if out and (not last or (last.split(";", 1)[0] if params else last) in (".", "..")):
        normalized += "/"
    return normalized


def _resolutions(decoded: str) -> tuple[str, ...]:
    """`decoded` resolved with path parameters stripped and, if that differs, kept."""
    servlet = _resolve(decoded)
    if ";" not in decoded:
        return (servlet,)
    literal = _resolve(decoded, params=False)
    return (servlet,) if literal == servlet else (servlet, literal)


def normalize_path(raw: str) -> str:
    """The path as written: the first of `path_readings`, and what the traffic log shows.

    Query and fragment dropped, percent-encoded unreserved characters decoded
    (other escapes upper-cased: `%2f` is data here), dot segments resolved,
    repeated slashes collapsed. Always starts with `/`.
    """
    path = raw.split("#", 1)[0].split("?", 1)[0]
    if path[:1] == "/" and "%" not in path and "/." not in path and "//" not in path:
        # Already normal (the common case): no escapes, and every segment is non-empty
        # (but a trailing one) and cannot be a dot segment, which starts with '.'.
        return path
    return _resolve(normalize_path_escapes(path))


#: What makes upstreams read a path differently: an encoded '/', '\' or '%' (a second
#: decoding pass), a '%' that starts no escape (decoded hex digits may complete one), a '\'.
_AMBIGUOUS = re.compile(r"%(?:2[Ff]|5[Cc]|25|(?![0-9A-Fa-f]{2}))|\\")
#: Escapes an upstream may decode beyond the unreserved characters, by their hex code.
_SEPARATOR_ESCAPES = ("2F", "5C", "25")
#: More readings than this, or more characters decoded to find them, and the path may be
#: anything: "/" joins the readings (only an entry covering every path covers it). Real
#: paths have one to four readings and take a few passes; the bound keeps a crafted
#: path's cost to milliseconds.
MAX_READINGS = 32
MAX_DECODED = 16_384
_BACKSLASH_NONE, _BACKSLASH_RAW, _BACKSLASH_ALL = 0, 1, 2


@functools.lru_cache(maxsize=16)
def _decode_table(extra: frozenset[str]) -> dict[str, str]:
    """Each two-digit escape code (any case) -> what a pass decoding `extra` makes of it."""
    table = {}
    for value in range(256):
        char, code = chr(value), f"{value:02X}"
        decoded = char if char in _UNRESERVED or code in extra else "%" + code
        for spelling in {code, code.lower(), code[0] + code[1].lower(), code[0].lower() + code[1]}:
            table[spelling] = decoded
    return table


def _decode_pass(path: str, extra: frozenset[str], backslash: int) -> str:
    """One upstream's decoding pass: unreserved characters and `extra` escapes, once.

    `backslash`: none is a separator, raw ones only (translated before decoding,
    as lighttpd on Windows), or every one (decoded `%5C` too, as IIS).
    """
    if backslash == _BACKSLASH_RAW:
        path = path.replace("\\", "/")
    if "%" in path:
        # split beats re.sub with a callback by half: this is the readings' hot loop.
        table = _decode_table(extra)
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            decoded = table.get(part[:2])
            if decoded is None:  # a bare '%'
                out.append("%" + part)
            else:
                out += (decoded, part[2:])
        path = "".join(out)
    return path.replace("\\", "/") if backslash == _BACKSLASH_ALL else path


@functools.lru_cache(maxsize=64)
def _passes(features: frozenset[str]) -> tuple[tuple[frozenset[str], int], ...]:
    """The decoding passes that can change a path with these features (escape codes, '\\')."""
    codes = [code for code in _SEPARATOR_ESCAPES if code in features]
    out = []
    for mask in range(1 << len(codes)):
        extra = frozenset(code for i, code in enumerate(codes) if mask >> i & 1)
        modes = [_BACKSLASH_NONE]
        if "\\" in features:
            modes.append(_BACKSLASH_RAW)
        if "5C" in extra:
            modes.append(_BACKSLASH_ALL)
        out += [(extra, mode) for mode in modes]
    return tuple(out)


def _features(path: str) -> frozenset[str]:
    """What in `path` a pass may read: `2F`, `5C`, `25`, `\\`, and "" for a bare '%'."""
    return frozenset(
        "\\" if token == "\\" else token[1:].upper() for token in set(_AMBIGUOUS.findall(path))
    )


#: An escape of an unreserved character: in a text a pass handed on, only from `%25`
#: or a bare '%' (`%%34%31` is `%41`); the next pass decodes it.
_UNRESERVED_ESCAPE = re.compile(r"%(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|2[DdEe]|5[Ff]|7[Ee])")


def may_read_otherwise(raw: str) -> bool:
    """Whether an upstream may read `raw` as another path than normalize_path's (an
    encoded separator or '%', a backslash, a ';' parameter, two leading slashes); else
    it has one reading."""
    return (
        ";" in raw
        or raw.startswith("//")
        or (("%" in raw or "\\" in raw) and _AMBIGUOUS.search(raw) is not None)
    )


def _authority_dropped(path: str) -> str | None:
    """The path a WHATWG URL parser gives a target starting with two slashes (`\\` is `/`
    to it), as Node's `new URL(req.url, base)` does: a scheme-relative URL, whose first
    segment is a host. `//repos/admin` is `/admin` there. None for other targets."""
    text = path.replace("\\", "/")
    if not text.startswith("//"):
        return None
    return "/" + text.lstrip("/").partition("/")[2]


def path_readings(raw: str) -> tuple[str, ...]:
    """Every path an upstream, or a chain of them, may serve for `raw`; the first is
    `normalize_path(raw)`, the path as written. See `_readings`; a target starting with
    two slashes also has the readings of what follows its first segment, which a WHATWG
    URL parser takes for a host (`_authority_dropped`)."""
    readings = _readings(raw)
    dropped = _authority_dropped(raw.split("#", 1)[0].split("?", 1)[0])
    if dropped is None:
        return readings
    merged = dict.fromkeys(readings)
    merged.update(dict.fromkeys(path_readings(dropped)))
    if len(merged) > MAX_READINGS:
        merged["/"] = None
    return tuple(merged)


def _readings(raw: str) -> tuple[str, ...]:
    """Every path an upstream, or a chain of them, may serve for `raw`; the first is
    `normalize_path(raw)`, the path as written.

    Upstreams disagree: nginx, lighttpd and Python's http.server decode `%2F` and
    then resolve dot segments (`/a/x%2f..%2f..%2fb` is `/b`), WHATWG URL parsers
    (Node) and Windows servers take `\\` for `/`, IIS decodes `%5C` to a separator,
    a decoding proxy that forwards without re-encoding has the next server decode
    `%25` again, and a proxy may resolve dot segments before the server decodes.
    So a reading is what dot-segment resolution makes of the path after any chain of
    decoding passes (each: unreserved characters, plus any of `%2F`, `%5C`, `%25`, with
    `\\` a separator or not), with or without resolution between the passes.
    Path parameters too: `..;x` is `..` to servlet containers and a name to others.
    Cheap: a path without `%2F`, `%5C`, `%25`, a bare `%`, `\\` or `;` has one reading.
    Past MAX_READINGS readings or MAX_DECODED characters decoded, "/" stands for anything.
    """
    path = raw.split("#", 1)[0].split("?", 1)[0]
    first = normalize_path(path)
    as_written = (first,)
    if ";" in path:  # `..;x` is `..` to servlet containers, a name to others
        as_written = _resolutions(normalize_path_escapes(path))
    if ("%" not in path and "\\" not in path) or not _AMBIGUOUS.search(path):
        # Every pass decodes this path as normalize_path does, and no escape can form.
        return as_written
    readings = dict.fromkeys(as_written)  # an insertion-ordered set
    # Texts an upstream may hand on, decoded or not, resolved or not: `first` is what a
    # proxy that only resolves dot segments forwards.
    todo = list(dict.fromkeys((path, *as_written)))
    seen = set(todo)
    budget = MAX_DECODED
    while todo:
        text = todo.pop()
        features = _features(text)
        passes = _passes(features)
        # The plain pass changes a text only through unreserved escapes: on the path as
        # written it gives `as_written` (unless a bare '%' completes an escape), and a
        # text handed on has them only when the pass before made them.
        if ("" not in features) if text is path else not _UNRESERVED_ESCAPE.search(text):
            passes = passes[1:]
        budget -= len(passes) * len(text)
        if budget < 0:
            readings["/"] = None
            break
        for extra, backslash in passes:
            decoded = _decode_pass(text, extra, backslash)
            resolved = _resolutions(decoded)
            readings.update(dict.fromkeys(resolved))
            for handed_on in (decoded, *resolved):
                # A text with nothing left to decode has no reading but its resolution.
                if handed_on not in seen and (
                    _AMBIGUOUS.search(handed_on) or _UNRESERVED_ESCAPE.search(handed_on)
                ):
                    seen.add(handed_on)
                    todo.append(handed_on)
        if len(readings) > MAX_READINGS:
            readings["/"] = None
            break
    return tuple(readings)


#: A whole path segment that matches any one segment: `/*/*/info/refs`.
SEGMENT_WILDCARD = "*"
#: An entry starting with this covers exactly one path: `=/user` is `/user`, not `/user/x`.
EXACT = "="


@dataclass(frozen=True, slots=True)
class PathEntry:
    """One `allowed_paths` entry, normalised once at compile time.

    Ending in `/`: a prefix (`/repos/` covers `/repos/a/b`). Otherwise the path
    and what lies below it at a segment boundary (`/user` covers `/user/x`, not
    `/users`). A segment that is exactly `*` matches any one segment, never a
    `/`: `/*/*/git-upload-pack` covers `/o/r.git/git-upload-pack`. Starting with
    `=`: that one path only (`=/user` covers `/user`, not `/user/x` or `/user/`).
    """

    text: str

    @property
    def is_prefix(self) -> bool:
        return self.text.endswith("/") and not self.is_exact

    @property
    def is_exact(self) -> bool:
        return self.text.startswith(EXACT)

    def covers(self, path: str) -> bool:
        if self.is_exact:
            return path == self.text[1:]
        if SEGMENT_WILDCARD in self.text:
            return _covers_by_segments(self.text, path)
        if self.is_prefix:
            return path.startswith(self.text)
        return path == self.text or path.startswith(self.text + "/")


@functools.lru_cache(maxsize=4096)
def _segments(path: str) -> tuple[str, ...]:
    inner = path.strip("/")
    return tuple(inner.split("/")) if inner else ()


def _covers_by_segments(pattern_text: str, path: str) -> bool:
    pattern, segments = _segments(pattern_text), _segments(path)
    if len(segments) < len(pattern):
        return False
    for want, got in zip(pattern, segments, strict=False):
        if want != SEGMENT_WILDCARD and want != got:
            return False
    if pattern_text.endswith("/"):  # a prefix covers what lies below it, or itself with '/'
        return len(segments) > len(pattern) or path.endswith("/")
    return True


def normalize_entry(path: str) -> str:
    """An `allowed_paths` entry as the policy compares it (`=` kept in front)."""
    if path.startswith(EXACT):
        return EXACT + normalize_path(path[1:])
    return normalize_path(path)
