"""wait_ready checks markers at every poll but asks supervisord (an XML-RPC round trip,
CPU on both sides while the services start) only every STATE_POLL, and still fails
fast when a program fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.container import supervisor
from runtime.container.console import SetupFailed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(supervisor.time, "monotonic", c.monotonic)
    return c


def components(tmp_path: Path) -> list[supervisor.Component]:
    return [
        supervisor.Component("firewall", tmp_path / "fw", 30, True),
        supervisor.Component("dnsguard", tmp_path / "dns", 30, False),
        supervisor.Component("interceptor", tmp_path / "ic", 30, False),
    ]


def test_markers_every_poll_states_every_state_poll(tmp_path, monkeypatch, clock) -> None:
    asked: list[str] = []

    def info(name: str) -> dict[str, Any]:
        asked.append(name)
        return {"statename": "RUNNING" if name != "firewall" else "STARTING"}

    monkeypatch.setattr(supervisor, "process_info", info)

    def pause(seconds: float) -> None:
        clock.pause(seconds)
        if clock.now >= 101.0:  # every service ready after 1 s
            for c in components(tmp_path):
                c.marker.touch()

    supervisor.wait_ready(components(tmp_path), pause)
    assert clock.now == pytest.approx(101.0, abs=0.06)
    looks = 1 + 1.0 / supervisor.STATE_POLL  # at 0, 0.25, ...: 5 looks of 3 programs
    assert len(asked) <= 3 * looks, asked  # was 3 per 50 ms poll: 60


def test_a_failed_program_still_stops_the_wait_soon(tmp_path, monkeypatch, clock) -> None:
    monkeypatch.setattr(
        supervisor,
        "process_info",
        lambda name: {"statename": "FATAL" if clock.now >= 100.3 else "STARTING"},
    )
    with pytest.raises(SetupFailed, match="could not lock the network"):
        supervisor.wait_ready(components(tmp_path), clock.pause)
    assert clock.now <= 100.3 + supervisor.STATE_POLL + 0.06


def test_until_supervisord_answers_it_is_asked_at_once_not_every_state_poll(
    tmp_path, monkeypatch, clock
) -> None:
    """supervisord 4.3 starts its programs only when its first poll returns (1 s) or
    something knocks on its socket: the first answered look must follow its listening
    closely, not STATE_POLL later."""
    listening_at = 100.13
    first_answer: list[float] = []

    def info(name: str) -> dict[str, Any] | None:
        if clock.now < listening_at:
            return None  # no socket yet
        first_answer.append(clock.now)
        return {"statename": "STARTING"}

    monkeypatch.setattr(supervisor, "process_info", info)
    monkeypatch.setattr(supervisor, "knock", lambda: clock.now >= listening_at)

    def pause(seconds: float) -> None:
        clock.pause(seconds)
        if clock.now >= 101.0:
            for c in components(tmp_path):
                c.marker.touch()

    supervisor.wait_ready(components(tmp_path), pause)
    assert first_answer[0] - listening_at <= supervisor.KNOCK_POLL + 1e-9
    later = [t for t in first_answer if t > first_answer[0] + 1e-9]
    assert len(later) <= 3 * (1.0 / supervisor.STATE_POLL + 1)  # then every STATE_POLL


def test_a_fault_is_an_answer_the_knocking_stops(tmp_path, monkeypatch, clock) -> None:
    """process_info is None on an XML-RPC fault too (a name supervisord does not know):
    supervisord answered, so the polls slow to MARKER_POLL and STATE_POLL, and a
    component that never becomes ready still ends the wait at its timeout."""
    asked: list[float] = []

    def info(name: str) -> None:
        asked.append(clock.now)
        return None

    monkeypatch.setattr(supervisor, "process_info", info)
    monkeypatch.setattr(supervisor, "knock", lambda: True)
    with pytest.raises(SetupFailed, match="did not report a verified lock"):
        supervisor.wait_ready(components(tmp_path)[:1], clock.pause)
    assert clock.now == pytest.approx(130.0, abs=0.3)
    assert len(asked) <= 30 / supervisor.STATE_POLL + 2  # not every KNOCK_POLL


def test_the_wake_knocks_until_supervisord_listens_then_stops(tmp_path, monkeypatch) -> None:
    """supervisord spawns at its first poll's return: the init's wake connects as soon
    as its socket listens (a real unix socket here), once, and ends."""
    import socket
    import threading
    import time

    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path))
    path = str(tmp_path / "supervisor.sock")
    accepted: list[float] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen_later() -> None:
        time.sleep(0.2)
        server.bind(path)
        server.listen(8)
        server.settimeout(2)
        conn, _ = server.accept()
        accepted.append(1)
        conn.close()

    listener = threading.Thread(target=listen_later)
    listener.start()
    waking = supervisor.wake_when_listening()
    waking.join(3)
    listener.join(3)
    server.close()
    assert not waking.is_alive()
    assert accepted == [1]


def test_the_wake_gives_up_when_supervisord_never_listens(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(supervisor, "WAKE_LIMIT", 0.1)
    waking = supervisor.wake_when_listening()
    waking.join(2)
    assert not waking.is_alive()  # wait_ready's own looks take over
