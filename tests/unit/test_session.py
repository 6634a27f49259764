"""The session file: one typed writer and reader, no fall-backs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runtime.container.session import Session, SessionError
from runtime.resolve import GLOBAL

SESSION = Session(
    config_kind=GLOBAL,
    config_path=Path("/home/appuser/.copilot_here/network.json"),
    config_sha256="ab" * 32,
    puid=0,
    pgid=0,
    app_uid=1000,
    app_gid=1000,
)


def test_round_trip(tmp_path: Path) -> None:
    path = SESSION.write(tmp_path / "session.json")
    assert Session.read(path) == SESSION
    assert json.loads(path.read_text())["config_path"] == str(SESSION.config_path)


def test_without_a_config_file(tmp_path: Path) -> None:
    plain = Session("built-in", None, None, 501, 20, 501, 20)
    assert Session.read(plain.write(tmp_path / "s.json")) == plain


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match=r"nothing-here\.json"):
        Session.read(tmp_path / "nothing-here.json")


@pytest.mark.parametrize(
    "change",
    [
        {"puid": "501"},  # a string is not an id
        {"app_uid": True},
        {"extra": 1},
    ],
)
def test_anything_else_is_refused(tmp_path: Path, change: dict) -> None:
    path = SESSION.write(tmp_path / "session.json")
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(SessionError, match=re.escape(str(path))):
        Session.read(path)


def test_a_missing_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps({"puid": 501, "pgid": 20}))
    with pytest.raises(SessionError, match="not a session file"):
        Session.read(path)
