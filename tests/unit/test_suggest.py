"""Rules from what was seen (suggest), and what a policy would now decide (replay)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.config import compile_policy, parse_config
from runtime.core.policy import Mode, Policy, make_rule
from runtime.core.suggest import Seen, apply_changes, fold_path, replay, suggest

EMPTY = Policy.build(Mode.MONITOR, True, (), "test")


def policy_of(rules: list[dict]) -> Policy:
    config = parse_config(
        json.dumps({"enabled": True, "mode": "enforce", "allowed_rules": rules}), "t"
    )
    return compile_policy(config, "t")


def test_fold_path_keeps_depth_segments_as_a_prefix() -> None:
    assert fold_path("/repos/o/r/pulls/1", 2) == "/repos/o/"
    assert fold_path("/user", 2) == "/user"
    assert fold_path("/a/b", 2) == "/a/b"
    assert fold_path("/a/b/", 2) == "/a/b"
    assert fold_path("/a/b/c?q=1", 1) == "/a/"
    assert fold_path("/x/../y/z", 5) == "/y/z"
    assert fold_path("/anything", 0) == "/"


def test_read_only_paths_become_one_prefix_rule_with_safe_methods() -> None:
    seen = [
        Seen("GET", "api.github.com", "/repos/o/r/pulls/1"),
        Seen("GET", "api.github.com", "/repos/o/r/issues"),
        Seen("HEAD", "api.github.com", "/user"),
    ]
    (change,) = suggest(seen, EMPTY)
    assert change.to_json() == {
        "host": "api.github.com",
        "allowed_paths": ["/repos/o/", "/user"],
        "methods": ["GET", "HEAD"],
    }
    assert change.warnings == () and change.requests == 3 and not change.extends


def test_writes_private_addresses_and_whole_hosts_are_flagged() -> None:
    changes = {
        c.host: c
        for c in suggest(
            [
                Seen("POST", "uploads.test", "/files/a/b/c"),
                Seen("GET", "10.1.2.3", "/metadata/x/y"),
                Seen("GET", "one.test", "/"),
            ],
            EMPTY,
        )
    }
    assert changes["uploads.test"].methods is None
    assert "allows writes (POST)" in changes["uploads.test"].warnings
    assert "a private or local address" in changes["10.1.2.3"].warnings
    assert changes["one.test"].allowed_paths == ()
    assert "the whole host, for requests to one path" in changes["one.test"].warnings


def test_what_the_policy_already_allows_is_not_suggested() -> None:
    policy = policy_of([{"host": "api.github.com", "allowed_paths": ["/user"]}])
    seen = [Seen("GET", "api.github.com", "/user/repos"), Seen("GET", "api.github.com", "/meta")]
    (change,) = suggest(seen, policy, depth=1)
    assert change.extends and change.allowed_paths == ("/meta",)
    rules = apply_changes([{"host": "api.github.com", "allowed_paths": ["/user"]}], [change])
    assert rules == [{"host": "api.github.com", "allowed_paths": ["/user", "/meta"]}]


def test_apply_keeps_wide_rules_wide() -> None:
    rules = [{"host": "a.test"}, {"host": "b.test", "allowed_paths": ["/x"], "methods": ["GET"]}]
    changes = suggest(
        [Seen("POST", "a.test", "/p"), Seen("DELETE", "b.test", "/y")],
        policy_of([{"host": "a.test", "methods": ["GET"]}, rules[1]]),
    )
    out = apply_changes(rules, changes)
    assert out[0] == {"host": "a.test"}
    assert out[1] == {"host": "b.test", "allowed_paths": ["/x", "/y"]}  # methods: any now


_segment = st.text(alphabet="abcxyz019-_.", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
_path = st.lists(_segment, min_size=0, max_size=5).map(lambda s: "/" + "/".join(s))
_seen = st.builds(
    Seen,
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
    host=st.sampled_from(["a.test", "b.test", "api.github.com", "10.0.0.1"]),
    path=_path,
)


@settings(max_examples=200, deadline=None)
@given(
    seen=st.lists(_seen, max_size=12),
    depth=st.integers(min_value=0, max_value=4),
    start=st.sampled_from([[], [{"host": "a.test", "allowed_paths": ["/a"], "methods": ["GET"]}]]),
)
def test_applying_the_suggestion_allows_everything_seen(seen, depth, start) -> None:
    before = policy_of(start)
    rules = apply_changes(start, suggest(seen, before, depth))
    after = policy_of(rules)
    assert not replay(seen, after).newly_blocked
    report = replay([Seen(i.method, i.host, i.path, blocked=True) for i in seen], after)
    assert len(report.newly_allowed) == len(seen)
    # And nothing needs suggesting any more.
    assert suggest(seen, after, depth) == []


def test_replay_reports_what_enforce_would_change() -> None:
    policy = Policy.build(Mode.MONITOR, True, [make_rule("api.github.com", ["/user"])], "t")
    seen = [
        Seen("GET", "api.github.com", "/user"),  # allowed then, allowed now
        Seen("GET", "evil.test", "/", violation=True),  # flagged then, blocked in enforce
        Seen("GET", "api.github.com", "/meta"),  # allowed then (allow-all run), blocked now
        Seen("GET", "api.github.com", "/user/x", blocked=True),  # blocked then, allowed now
    ]
    report = replay(seen, policy)
    assert [r.item.path for r in report.newly_blocked] == ["/meta"]
    assert [r.item.path for r in report.newly_allowed] == ["/user/x"]
    assert report.unchanged == 2
    assert report.newly_blocked[0].reason == "path_not_allowed"
