"""Rules from what was seen (suggest), and what a policy would now decide (replay)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.compile import built_in_rules, compile_policy
from runtime.core.config import parse_config
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
    assert changes["uploads.test"].methods == ("POST",)  # the methods seen, never every one
    assert "allows writes (POST)" in changes["uploads.test"].warnings
    assert "a private or local address" in changes["10.1.2.3"].warnings
    assert changes["one.test"].allowed_paths == ()
    assert "the whole host, for requests to one path" in changes["one.test"].warnings


def test_what_the_policy_already_allows_is_not_suggested() -> None:
    policy = policy_of([{"host": "api.github.com", "allowed_paths": ["/user"]}])
    seen = [Seen("GET", "api.github.com", "/user/repos"), Seen("GET", "api.github.com", "/meta")]
    (change,) = suggest(seen, policy, depth=1)
    assert change.extends and change.allowed_paths == ("/meta",) and not change.carried
    rules = apply_changes([{"host": "api.github.com", "allowed_paths": ["/user"]}], [change])
    # The rule allows every method: /meta gets a rule of its own, for GET only.
    assert rules == [
        {"host": "api.github.com", "allowed_paths": ["/user"]},
        {"host": "api.github.com", "allowed_paths": ["/meta"], "methods": ["GET"]},
    ]
    same = [{"host": "api.github.com", "allowed_paths": ["/user"], "methods": ["get"]}]
    assert apply_changes(same, [change]) == [
        {"host": "api.github.com", "allowed_paths": ["/user", "/meta"], "methods": ["get"]}
    ]


def test_apply_never_widens_a_rule_to_other_methods_or_paths() -> None:
    rules = [{"host": "a.test"}, {"host": "b.test", "allowed_paths": ["/x"], "methods": ["GET"]}]
    changes = suggest(
        [Seen("POST", "a.test", "/p"), Seen("DELETE", "b.test", "/y")],
        policy_of([{"host": "a.test", "methods": ["GET"]}, rules[1]]),
    )
    out = apply_changes(rules, changes)
    assert out[:2] == rules  # unchanged: DELETE is not added to GET's paths
    assert out[2:] == [
        {"host": "a.test", "allowed_paths": ["/p"], "methods": ["POST"]},
        {"host": "b.test", "allowed_paths": ["/y"], "methods": ["DELETE"]},
    ]


WILD = {"host": "*.example.com", "methods": ["GET"]}


def test_rules_a_new_rule_would_replace_are_carried() -> None:
    """A rule of the config for a host replaces the built-in rules for it and shadows
    a wildcard: what they allowed is copied, so it stays allowed."""
    built_in = built_in_rules(
        [{"host": "api.github.com", "allowed_paths": ["/user"], "methods": ["GET"]}]
    )
    config = parse_config(
        json.dumps({"enabled": True, "mode": "monitor", "allowed_rules": [WILD]}),
        "t",
    )
    policy = compile_policy(config, "t", built_in)
    seen = [Seen("GET", "api.github.com", "/meta"), Seen("PUT", "a.example.com", "/x")]
    changes = suggest(seen, policy)
    assert [c.carried for c in changes] == [
        ({"host": "a.example.com", "methods": ["GET"]},),
        ({"host": "api.github.com", "allowed_paths": ["/user"], "methods": ["GET"]},),
    ]
    rules = apply_changes([WILD], changes)
    after = compile_policy(
        parse_config(json.dumps({"enabled": True, "allowed_rules": rules}), "t"), "t", built_in
    )
    for item in [
        *seen,
        Seen("GET", "a.example.com", "/y"),
        Seen("GET", "api.github.com", "/user"),
    ]:
        assert not replay([item], after).newly_blocked, item


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
