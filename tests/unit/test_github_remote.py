"""The project's GitHub repository from its origin URL: the forms git writes, and
nothing that could widen a rule (another host, extra segments, odd characters)."""

from __future__ import annotations

import pytest

from runtime.core.github import parse_remote, redact, repository_of, repository_values


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/octo-org/proj.git",
        "https://github.com/octo-org/proj",
        "https://github.com/octo-org/proj/",
        "https://GitHub.com/octo-org/proj.git",
        "http://github.com/octo-org/proj.git",
        "https://x-access-token:ghp_secret@github.com/octo-org/proj.git",
        "https://github.com:443/octo-org/proj.git",
        "git@github.com:octo-org/proj.git",
        "git@github.com:octo-org/proj",
        "github.com:octo-org/proj.git",
        "ssh://git@github.com/octo-org/proj.git",
        "ssh://git@github.com:22/octo-org/proj",
        "git://github.com/octo-org/proj.git",
        "  https://github.com/octo-org/proj.git\n",
    ],
)
def test_the_forms_git_writes(url: str) -> None:
    assert parse_remote(url) == ("octo-org", "proj")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/srv/git/proj.git",
        "../proj",
        "file:///srv/octo-org/proj.git",
        "https://gitlab.com/octo-org/proj.git",
        "https://github.com.evil.test/octo-org/proj.git",
        "https://evil.test/github.com/octo-org/proj.git",
        "https://api.github.com/octo-org/proj",
        "git@evil.test:octo-org/proj.git",
        "https://github.com/octo-org",
        "https://github.com/octo-org/proj/extra",
        "https://github.com//octo-org/proj",
        "https://github.com/octo-org/proj?x=1",
        "https://github.com/octo-org/proj#frag",
        "https://github.com/octo-org/%2e%2e",
        "https://github.com/octo-org/..",
        "https://github.com/../proj",
        "https://github.com/octo_org/proj",  # owners have no '_'
        "https://github.com/octo-org/pr*j",
        "https://github.com/octo-org/{{GITHUB_REPO}}",
        "https://[::1/octo-org/proj",
        "ftp://github.com/octo-org/proj",
    ],
)
def test_anything_else_is_no_repository(url: str) -> None:
    assert parse_remote(url) is None


def test_repo_names_keep_dots_and_underscores() -> None:
    assert parse_remote("https://github.com/o/my_lib.js.git") == ("o", "my_lib.js")
    assert parse_remote("git@github.com:o/x.git.git") == ("o", "x.git")


def test_a_token_is_never_shown() -> None:
    assert redact("https://user:ghp_secret@github.com/o/r.git") == "https://github.com/o/r.git"
    assert redact("git@github.com:o/r.git") == "git@github.com:o/r.git"


def test_values_passed_to_the_container() -> None:
    assert repository_values("octo-org/proj") == {"GITHUB_OWNER": "octo-org", "GITHUB_REPO": "proj"}
    for bad in (None, "", "octo-org", "a/b/c", "octo-org/..", "/proj", "octo org/proj"):
        assert repository_values(bad) == {}, bad
    assert repository_of(repository_values("octo-org/proj")) == "octo-org/proj"
    assert repository_of({}) is None
