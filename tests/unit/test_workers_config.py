"""The interceptor's workers as the init resolves them and waits for them."""

from __future__ import annotations

from runtime import paths
from runtime.container import services


def test_auto_is_the_cores_at_most_four(monkeypatch):
    for cores, expect in ((1, 1), (2, 2), (4, 4), (64, 4)):
        monkeypatch.setattr(services, "available_cores", lambda c=cores: c)
        assert services.resolve_workers(None) == expect
    assert services.resolve_workers(8) == 8  # an explicit number is taken as written


def test_readiness_waits_for_every_worker(monkeypatch, tmp_path):
    monkeypatch.setenv("SECURE_PROXY_RUN_DIR", str(tmp_path))
    monkeypatch.setenv(services.WORKERS_ENV, "3")
    parts = services.components("interceptor")
    # One supervisord program (the pool), one marker per worker, one shared log.
    assert [c.name for c in parts] == ["interceptor"] * 3
    assert [c.marker.name for c in parts] == [
        "interceptor.ready",
        "interceptor-1.ready",
        "interceptor-2.ready",
    ]
    assert {c.log for c in parts} == {paths.component_log_dir() / "interceptor.log"}
    monkeypatch.delenv(services.WORKERS_ENV)
    assert len(services.components("interceptor")) == 1
