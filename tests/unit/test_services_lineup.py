"""Which programs a run starts: the level's, less what a fixed (read-only) config never
needs. Each left out is a Python process not importing on the start-up's cores."""

from __future__ import annotations

import pytest

from firewall.level import LockLevel
from runtime.container import services

NONE, INTERCEPT, FULL = LockLevel.NONE, LockLevel.INTERCEPT, LockLevel.FULL


def on(level: LockLevel, live: bool, ports: bool) -> set[str]:
    env = services.autostart_env(level, live, ports)
    assert set(env) == {f"SECURE_PROXY_START_{p.upper()}" for p in services.PROGRAMS}
    assert set(env.values()) <= {"true", "false"}
    return {p for p in services.PROGRAMS if env[f"SECURE_PROXY_START_{p.upper()}"] == "true"}


#: Everything a writable config at level full runs.
EVERY = {"firewall", "logguard", "reloader", "interceptor", "dnsguard", "portkeeper"}


@pytest.mark.parametrize("ports", [False, True])
def test_a_writable_config_runs_the_reloader_and_every_service_of_the_level(ports):
    # An edit may raise the level or add a ports rule: the level alone decides.
    assert on(NONE, True, ports) == {"logguard", "reloader"}
    assert on(INTERCEPT, True, ports) == {"firewall", "logguard", "reloader", "interceptor"}
    assert on(FULL, True, ports) == EVERY


def test_a_read_only_config_starts_no_reloader_and_no_idle_port_keeper():
    assert on(INTERCEPT, False, False) == {"firewall", "logguard", "interceptor"}
    assert on(FULL, False, False) == EVERY - {"reloader", "portkeeper"}
    # A rule with ports: the keeper opens them, read-only or not.
    assert on(FULL, False, True) == EVERY - {"reloader"}


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("ports", [False, True])
@pytest.mark.parametrize("level", [INTERCEPT, FULL])
def test_readiness_waits_for_exactly_the_services_started(monkeypatch, level, live, ports):
    monkeypatch.setenv(services.WORKERS_ENV, "2")
    waited = {c.name for c in services.readiness(level, live, ports)}
    assert waited == on(level, live, ports) - {"logguard", "reloader"}
    assert "firewall" in waited  # the verified lock, always


def test_inactive_waits_for_nothing():
    assert services.readiness(NONE, True, True) == []
    assert services.readiness(NONE, False, False) == []


def test_the_reloaders_switch_keeps_the_whole_level():
    # switch() and signal_services() run only in the reloader, i.e. with a live config.
    assert services.started(FULL) == services.SERVICES[FULL]
    assert "portkeeper" not in services.started(FULL, live=False, ports=False)
