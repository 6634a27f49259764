"""Path normalisation, path rules and path readings: no prefix escapes."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.paths import MAX_READINGS, PathEntry, normalize_path, path_readings
from runtime.core.policy import Action, Mode, Policy, Request, make_rule


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("/a/b?x=1#f", "/a/b"),
        ("/a/b/?x", "/a/b/"),
        ("//repos//a", "/repos/a"),
        ("/repos/../admin", "/admin"),
        ("/repos/%2e%2e/admin", "/admin"),
        ("/repos/%2E%2E/admin", "/admin"),
        ("//repos/../admin", "/admin"),
        ("/repos/./a/.", "/repos/a/"),
        ("/a/b/..", "/a/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/%7Euser/%41", "/~user/A"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%2Fb/../c", "/c"),
        ("/repos/..;/admin", "/admin"),
        ("/a%20b", "/a%20b"),
        ("relative/x", "/relative/x"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


def covers(entry: str, path: str) -> bool:
    return PathEntry(normalize_path(entry)).covers(normalize_path(path))


@pytest.mark.parametrize(
    ("entry", "path", "expected"),
    [
        ("/repos/", "/repos/a/b", True),
        ("/repos/", "/repos/", True),
        ("/repos/", "/repos", False),
        ("/repos/", "/reposx", False),
        ("/user", "/user", True),
        ("/user", "/user/repos", True),
        ("/user", "/users", False),
        ("/user", "/user?x=1", True),
        ("/repos/", "/repos/../admin", False),
        ("/repos/", "/repos/%2e%2e/admin", False),
        ("/repos/", "//repos/../admin", False),
        ("/repos/", "/repos/..;/admin", False),
        ("/a/b", "/a%2fb", False),
        ("/a", "/a%2fb", False),
        ("/", "/anything/at/all", True),
    ],
)
def test_path_entries(entry: str, path: str, expected: bool) -> None:
    assert covers(entry, path) is expected


segment = st.sampled_from(
    ["a", "b", "repos", ".", "..", "%2e%2e", "%2E", "", "..;x", "%2f", "x%41"]
)
raw_paths = st.lists(segment, max_size=8).map(lambda parts: "/" + "/".join(parts))


@given(raw_paths)
def test_normalization_is_idempotent(raw: str) -> None:
    once = normalize_path(raw)
    assert normalize_path(once) == once
    assert once.startswith("/")
    assert "//" not in once
    assert all(seg not in (".", "..") for seg in once.split("/"))


@given(raw_paths)
def test_no_prefix_escape(tail: str) -> None:
    """Whatever follows /repos/, either the normalised path stays under /repos/ or the
    entry does not cover it: dot segments can never smuggle a path in."""
    path = normalize_path("/repos/" + tail)
    if covers("/repos/", "/repos/" + tail):
        assert path.startswith("/repos/")
    # Starting anywhere else never reaches /repos/ coverage through tricks.
    outside = normalize_path("/admin/" + tail)
    if covers("/repos/", "/admin/" + tail):
        assert outside.startswith("/repos/")


# --------------------------------------------------------------------------- readings
#
# Upstreams read an ambiguous path differently; path_readings lists every reading,
# and a path is allowed only when each is. The models below are written apart from
# the policy code (one uses the standard library's own http.server) and say what
# real servers, and chains of them, serve for a raw path.


def test_one_reading_for_ordinary_paths() -> None:
    for raw in ("/repos/o/r", "/repos/a%20b", "/%7Euser", "/a/../b?x=%2f", "/a/%2e%2e/b"):
        assert path_readings(raw) == (normalize_path(raw),), raw


@pytest.mark.parametrize(
    ("raw", "served"),
    [
        # nginx, lighttpd, http.server: %2F decoded, then dot segments resolved
        ("/repos/x%2f..%2f..%2fadmin", "/admin"),
        ("/repos/x%2F..%2F..%2Fadmin", "/admin"),
        ("/repos/..%2fadmin", "/admin"),
        ("/repos/%2e%2e%2fadmin", "/admin"),
        ("/repos/%2f/..", "/"),
        # WHATWG URL (Node), Windows: backslash is a separator
        ("/repos/x\\..\\..\\admin", "/admin"),
        # IIS: %5C decoded to a separator
        ("/repos/x%5c..%5c..%5cadmin", "/admin"),
        ("/repos/x%5C..%5C..%5Cadmin", "/admin"),
        # Node: WHATWG parse ('\' -> '/'), then decodeURIComponent and path.join
        ("/repos/x%2f..\\..%2fadmin", "/admin"),
        # a decoding proxy that forwards without re-encoding: decoded twice
        ("/repos/x%252f..%252f..%252fadmin", "/admin"),
        ("/repos/x%25%32f..%25%32f..%25%32fadmin", "/admin"),
        ("/repos/%252f/..", "/"),
        # a bare '%' and encoded hex digits make an escape for the next decoder
        ("/repos/x%%32%66..%%32%66..%%32%66admin", "/admin"),
        # a proxy resolves dot segments first, the server decodes after
        ("/repos/a%2fb/../x%2f..%2f..%2fadmin", "/admin"),
        # `..;x` is `..` to a servlet container, a name to nginx
        ("/repos/..;x/admin", "/admin"),
        ("/..;x/repos/", "/..;x/repos/"),
        ("/.;x/repos/a", "/.;x/repos/a"),
        # WHATWG URL (Node): two leading slashes make the first segment a host
        ("//repos/admin", "/admin"),
        ("///repos/admin", "/admin"),
        ("/\\repos/admin", "/admin"),
    ],
)
def test_readings_include_what_upstreams_serve(raw: str, served: str) -> None:
    readings = path_readings(raw)
    assert readings[0] == normalize_path(raw)
    assert served in readings, readings
    assert not all(covers_all("/repos/", r) for r in readings)


def covers_all(entry: str, reading: str) -> bool:
    return PathEntry(normalize_path(entry)).covers(reading)


def test_encoded_slash_under_the_prefix_stays_allowed() -> None:
    for raw in ("/repos/a%2fb", "/repos/a\\b", "/repos/a%5cb", "/repos/a%252fb", "/repos/a%2f%2e"):
        readings = path_readings(raw)
        assert len(readings) > 1, raw
        assert all(covers_all("/repos/", r) for r in readings), (raw, readings)


def test_too_many_readings_read_as_anything() -> None:
    crafted = "/repos/" + "a%2f%5c\\%25..%" * 40
    readings = path_readings(crafted)
    assert readings[-1] == "/"
    assert len(readings) <= MAX_READINGS + 1
    assert not all(covers_all("/repos/", r) for r in readings)
    assert all(covers_all("/", r) for r in readings)
    # A long ordinary path with an encoded slash is within the bound.
    long = "/repos/" + "a%2f" * 1500
    assert path_readings(long)[-1] != "/"


# -- independent models of upstream decoding ------------------------------------------

_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _remove_dots(path: str, *, strict_root: bool = False, servlet: bool = False) -> str | None:
    """Dot segments resolved, empty segments dropped; None when the server refuses."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments:
        name = segment.split(";", 1)[0] if servlet else segment
        if segment == "" or name == ".":
            continue
        if name == "..":
            if not out and strict_root:
                return None  # nginx: 400 Bad Request
            if out:
                out.pop()
            continue
        out.append(segment)
    last = segments[-1].split(";", 1)[0] if servlet else segments[-1]
    tail = "/" if out and last in ("", ".", "..") else ""
    return "/" + "/".join(out) + tail


def nginx(raw: str) -> str | None:
    if _BARE_PERCENT.search(raw):
        return None
    return _remove_dots(unquote(raw), strict_root=True)


def http_server(raw: str) -> str:
    handler = SimpleHTTPRequestHandler.__new__(SimpleHTTPRequestHandler)
    handler.directory = "/srv"
    return handler.translate_path(raw)[len("/srv") :] or "/"


def whatwg(raw: str) -> str:
    """Node's `new URL(path, base).pathname`: '\\' is '/', `%2e` is '.', empty segments kept;
    two leading slashes start a scheme-relative URL, whose first segment is the host."""
    text = raw.replace("\\", "/")
    if text.startswith("//"):
        text = "/" + text.lstrip("/").partition("/")[2]
    segments = text.split("/")[1:]
    out: list[str] = []
    for i, segment in enumerate(segments):
        lower = segment.lower()
        if lower in ("..", ".%2e", "%2e.", "%2e%2e"):
            if out:
                out.pop()
        elif lower not in (".", "%2e"):
            out.append(segment)
            continue
        if i == len(segments) - 1:
            out.append("")
    return "/" + "/".join(out)


def node_static(raw: str) -> str:
    """The usual Node static server: WHATWG parse, decodeURIComponent, path.join."""
    return posixpath.normpath("/" + unquote(whatwg(raw)).lstrip("/"))


def iis(raw: str) -> str | None:
    return _remove_dots(unquote(raw).replace("\\", "/"))


def lighttpd(raw: str) -> str:
    """Dot segments resolved with %2F kept, then decoded for the file system."""
    return posixpath.normpath(unquote(normalize_path(raw)))


def servlet(raw: str) -> str | None:
    return _remove_dots(unquote(raw), servlet=True)


def double_decoding(raw: str) -> str:
    return posixpath.normpath("/" + unquote(unquote(raw)).lstrip("/"))


def decoding_proxy_to_http_server(raw: str) -> str | None:
    front = nginx(raw)
    return None if front is None else http_server(front)


def resolving_proxy_to_nginx(raw: str) -> str | None:
    return nginx(_remove_dots(raw) or "/")


UPSTREAMS = (
    nginx,
    http_server,
    whatwg,
    node_static,
    iis,
    lighttpd,
    servlet,
    double_decoding,
    decoding_proxy_to_http_server,
    resolving_proxy_to_nginx,
)


def under_repos(served: str) -> bool:
    """Inside /repos/ as a file system sees it (repeated slashes are one)."""
    collapsed = re.sub("/+", "/", served)
    return (collapsed.rstrip("/") + "/").startswith("/repos/")


ATOMS = st.sampled_from(
    [
        *("", ".", "..", "%2e", "%2E%2e", "a", "b", "admin", ";x", "repos"),
        *("%2f", "%2F", "%5c", "%5C", "\\", "%25", "%252f", "%255C", "%252e"),
        *("%", "%32", "%66", "%2", "%%32%66", "%25%32%66"),
    ]
)
ambiguous_paths = st.tuples(
    st.sampled_from(["/repos/", "/", "/repos", "/repos/a/"]),
    st.lists(st.lists(ATOMS, min_size=1, max_size=3).map("".join), max_size=7),
).map(lambda parts: parts[0] + "/".join(parts[1]))

REPOS_RULE = make_rule("api.github.com", ["/repos/", "/user"])
POLICY = Policy.build(Mode.ENFORCE, False, [REPOS_RULE], "test")


def allowed(raw: str) -> bool:
    return POLICY.decide(Request("GET", raw, sni="api.github.com")).action is Action.ALLOW


@settings(max_examples=3000, deadline=None)
@given(ambiguous_paths)
def test_allowed_means_every_reading_is_under_an_allowed_entry(raw: str) -> None:
    if allowed(raw):
        for reading in path_readings(raw):
            assert REPOS_RULE.allows_path(reading), (raw, reading)


@settings(max_examples=3000, deadline=None)
@given(ambiguous_paths)
def test_allowed_means_no_upstream_serves_outside_the_prefix(raw: str) -> None:
    if not raw.startswith("/repos/") or not allowed(raw):
        return
    for upstream in UPSTREAMS:
        served = upstream(raw)
        assert served is None or under_repos(served), (upstream.__name__, raw, served)


@pytest.mark.parametrize("upstream", UPSTREAMS, ids=lambda f: f.__name__)
def test_each_model_really_climbs_on_something(upstream: Callable[[str], str | None]) -> None:
    """The models are not vacuous: each serves /admin for some path under /repos/."""
    climbs = [
        raw
        for raw, _ in test_readings_include_what_upstreams_serve.pytestmark[0].args[1]
        if (served := upstream(raw)) is not None and not under_repos(served)
    ]
    assert climbs, upstream.__name__
    assert not any(allowed(raw) for raw in climbs)


# -- segment wildcards ------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "path", "covered"),
    [
        ("/*/*/git-upload-pack", "/o/r.git/git-upload-pack", True),
        ("/*/*/git-upload-pack", "/o/r/git-upload-pack", True),
        ("/*/*/git-upload-pack", "/o/git-upload-pack", False),
        ("/*/*/git-upload-pack", "/o/r/x/git-upload-pack", False),
        ("/*/*/git-upload-pack", "/o/r/git-receive-pack", False),
        ("/*/*/info/refs", "/o/r/info/refs", True),
        ("/*/*/info/refs", "/o/r/info/refsx", False),
        ("/repos/*/", "/repos/o/anything/below", True),
        ("/repos/*/", "/repos/o/", True),
        ("/repos/*/", "/repos/o", False),
        ("/repos/*", "/repos/o", True),
        ("/repos/*", "/repos", False),
        ("/repos/*", "/repos/", False),
    ],
)
def test_segment_wildcard(entry: str, path: str, covered: bool) -> None:
    assert PathEntry(entry).covers(path) is covered


_seg = st.text(alphabet="ab*./%", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))


@given(st.lists(_seg, min_size=0, max_size=5), st.booleans())
def test_segment_wildcard_never_spans_a_slash(segments: list[str], trailing: bool) -> None:
    """`/*/x` covers a path exactly when its second segment is `x`: a `*` is one segment."""
    path = "/" + "/".join(segments) + ("/" if trailing and segments else "")
    parts = [s for s in path.split("/") if s]
    expected = len(parts) >= 2 and parts[1] == "x"
    assert PathEntry("/*/x").covers(path) is expected
