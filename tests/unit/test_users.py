"""Which uid the user command gets: never root, never the proxy user."""

from __future__ import annotations

import pytest

from runtime.container.console import SetupFailed
from runtime.container.users import app_ids


def test_root_maps_to_1000() -> None:
    assert app_ids(0, 0, proxy_uid=999) == (1000, 1000)


def test_host_ids_kept() -> None:
    assert app_ids(1234, 5678, proxy_uid=999) == (1234, 5678)


def test_proxy_users_uid_is_refused() -> None:
    with pytest.raises(SetupFailed, match="bypasses the interceptor"):
        app_ids(999, 1000, proxy_uid=999)
