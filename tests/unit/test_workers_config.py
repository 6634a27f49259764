"""The interceptor's workers as the init resolves them and supervisord names them."""

from __future__ import annotations

import xmlrpc.client

import pytest

from runtime import paths
from runtime.container import services, supervisor


def test_auto_is_the_cores_at_most_four(monkeypatch):
    for cores, expect in ((1, 1), (2, 2), (4, 4), (64, 4)):
        monkeypatch.setattr(services, "available_cores", lambda c=cores: c)
        assert services.resolve_workers(None) == expect
    assert services.resolve_workers(8) == 8  # an explicit number is taken as written


def test_readiness_waits_for_every_worker(monkeypatch, tmp_path):
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path))
    monkeypatch.setenv(services.WORKERS_ENV, "3")
    parts = services.components("interceptor")
    assert [c.name for c in parts] == [f"interceptor:interceptor_{n}" for n in range(3)]
    assert [c.marker.name for c in parts] == [
        "interceptor.ready",
        "interceptor-1.ready",
        "interceptor-2.ready",
    ]
    assert parts[2].log == paths.component_log_dir() / "interceptor_2.log"
    assert services.namespec("interceptor") == "interceptor:*"
    assert services.namespec("dnsguard") == "dnsguard"
    monkeypatch.delenv(services.WORKERS_ENV)
    assert len(services.components("interceptor")) == 1


def test_a_group_call_fails_on_any_process_but_the_ignored_fault():
    ok = {"name": "interceptor_0", "group": "interceptor", "status": supervisor.SUCCESS}
    running = {**ok, "name": "interceptor_1", "status": supervisor.ALREADY_STARTED}
    supervisor._group_result([ok, running], supervisor.ALREADY_STARTED)
    supervisor._group_result(True)  # one process: no list
    with pytest.raises(xmlrpc.client.Fault, match="interceptor:interceptor_1"):
        supervisor._group_result([ok, {**running, "status": 50, "description": "SPAWN_ERROR"}])
