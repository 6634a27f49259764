"""Property: whatever the argv and whatever lies where the configs are, main() ends
with a code (0, 1, 2 or 3; argparse's SystemExit 0 or 2), never a traceback, and
never starts an engine (every run is a --dry-run, no engine is on PATH)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime.host import cli

ROOT = Path(__file__).resolve().parents[2]

FLAGS = [
    "--network-init",
    "--network-init-global",
    "--network-show",
    "--network-enable",
    "--network-disable",
    "--network-enable-global",
    "--network-disable-global",
    "--network-trust",
    "--no-inherit",
    "--force",
    "--network-config-write",
    "--dry-run",
    "--pull",
    "--no-pull",
    "-h",
    "--network-logs",
    "--network-suggest",
    "--network-replay",
    "--network-edit",
    "--network-migrate",
    "--blocked",
    "--violations",
    "--json",
    "--summary",
    "--dns",
    "--apply",
    "--all",
    "--accept-widening",
    "--global",
]
WITH_VALUE = [
    "--network-check",
    "--method",
    "--engine",
    "--image",
    "--add-host",
    "--logs-dir",
    "--sandbox-netns",
    "--engine-arg",
    "--cap-drop",
    "--network-allow",
    "--network-remove",
    "--network-mode",
    "--since",
    "--depth",
]
VALUES = [
    "https://a.test/x?y=1",
    "http://[::1",
    "http://a b/",
    "ftp://x.test/",
    "a.test",
    "https://10.0.0.1:99999/",
    "GET",
    "post",
    "G ET",
    "docker",
    "podman",
    "sandbox",
    "bogus",
    "x.test:198.18.0.1",
    "noip",
    "--network=host",
    "--net",
    "host",
    "NET_ADMIN",
    "",
    "-",
    "/",
    "relative/logs",
    "/nonexistent/logs",
    "monitor",
    "enforce",
    "2h",
    "3",
    "a.test/x/",
    "*.b.test",
]
SAFE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
TOKEN = st.one_of(
    st.sampled_from(FLAGS),
    st.sampled_from(WITH_VALUE),
    st.sampled_from(VALUES),
    st.builds(lambda o, v: f"{o}={v}", st.sampled_from(WITH_VALUE), st.sampled_from(VALUES)),
    st.builds(lambda t: "--network-" + t, SAFE_TEXT),
    st.builds(lambda t: "network-" + t, SAFE_TEXT),
    st.just("--"),
    SAFE_TEXT,
)

CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "enabled": st.one_of(st.booleans(), st.just("yes")),
        "mode": st.sampled_from(["monitor", "enforce", "strict"]),
        "log_to_file": st.booleans(),
        "inherit_defaults": st.booleans(),
        "allowed_rules": st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"host": st.sampled_from(["a.test", "*.b.test", "10.0.0.0/8", "*", ""])},
                    optional={
                        "allowed_paths": st.lists(
                            st.sampled_from(["/", "/x/", "x", 1]), max_size=2
                        ),
                        "methods": st.lists(st.sampled_from(["GET", "BREW", 3]), max_size=2),
                    },
                ),
                st.just("a.test"),
            ),
            max_size=3,
        ),
    },
)
CONTENT = st.one_of(
    st.builds(lambda d: json.dumps(d).encode(), CONFIG),
    st.builds(lambda d: b"\xef\xbb\xbf" + json.dumps(d).encode(), CONFIG),
    st.binary(max_size=40),
    st.builds(lambda t: t.encode(), SAFE_TEXT),
)
# What lies where a config belongs: nothing, a file, a directory, a file instead of
# .copilot_here, a symlink (dangling or to a file).
PLACE = st.one_of(
    st.just(("none", b"")),
    st.tuples(st.just("file"), CONTENT),
    st.just(("dir", b"")),
    st.just(("parent-file", b"")),
    st.tuples(st.just("link"), CONTENT),
    st.just(("dangling", b"")),
)


def lay(base: Path, place: tuple[str, bytes], elsewhere: Path) -> None:
    kind, content = place
    config = base / ".copilot_here" / "network.json"
    if kind == "none":
        return
    if kind == "parent-file":
        config.parent.write_bytes(b"x")
        return
    config.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        config.write_bytes(content)
    elif kind == "dir":
        config.mkdir()
    elif kind == "link":
        target = elsewhere / "network.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        config.symlink_to(target)
    elif kind == "dangling":
        config.symlink_to(elsewhere / "missing.json")


@contextlib.contextmanager
def world(repo: tuple[str, bytes], glob: tuple[str, bytes]) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sp-prop-"))
    saved_cwd = os.getcwd()
    saved_env = dict(os.environ)
    try:
        project, home = base / "project", base / "home"
        project.mkdir()
        home.mkdir()
        share = base / "share"
        shutil.copytree(ROOT / "config", share)
        lay(project, repo, base / "elsewhere-repo")
        lay(home, glob, base / "elsewhere-global")
        os.environ.update(
            HOME=str(home),
            XDG_STATE_HOME=str(base / "state"),
            SECURE_PROXY_SHARE=str(share),
            PATH=str(base / "no-engines"),
            EDITOR="false",  # --network-edit: an editor that fails, never one that waits
        )
        os.chdir(project)
        yield base
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(base, ignore_errors=True)


@settings(
    max_examples=int(os.environ.get("SP_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(argv=st.lists(TOKEN, max_size=6), repo=PLACE, glob=PLACE)
def test_main_never_raises(argv: list[str], repo, glob) -> None:
    assume(not {"-f", "--follow"} & set(argv))  # following a log never ends by itself
    argv = ["--dry-run", *argv]  # a run never starts an engine
    out, err = io.StringIO(), io.StringIO()
    with world(repo, glob), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: --help, or a usage error
            assert exc.code in (0, 2), (argv, exc.code, err.getvalue())
            return
    assert code in (0, 1, 2, 3), (argv, code)
    assert "Traceback" not in err.getvalue()
    if code in (1, 2):
        assert err.getvalue().strip(), (argv, code)  # an error always says why
