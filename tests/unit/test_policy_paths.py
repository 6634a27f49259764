"""Path normalisation and path rules: no prefix escapes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.core.policy import PathEntry, normalize_path


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
