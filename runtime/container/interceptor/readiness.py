"""Readiness: the CA certificate published, then the readiness marker, once listening."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from loguru import logger
from mitmproxy import ctx

from runtime import fsutil, paths
from runtime.container.interceptor import pool

CA_CERT_NAME = paths.CA_CERT_NAME


def write_atomic(target: Path, data: bytes, mode: int) -> None:
    """Replace atomically; fall back to rewriting in place if the directory is not
    ours (a file pre-created for us by root)."""
    try:
        fsutil.atomic_write(target, data, mode)
    except PermissionError:
        with open(target, "wb") as handle:
            handle.write(data)
        with contextlib.suppress(PermissionError):
            os.chmod(target, mode)


class Readiness:
    """CA certificate published, then the readiness marker -- only once listening.

    mitmproxy calls `running` after its servers are bound, so the marker never
    appears before port 58080 accepts connections. A stale marker is removed at
    start and the marker is removed at shutdown.
    """

    def load(self, loader: Any) -> None:
        loader.add_option(
            "secure_proxy_ca_cert",
            str,
            str(paths.ca_cert()),
            "Where to publish the public CA certificate (0644).",
        )
        loader.add_option(
            "secure_proxy_ready_marker",
            str,
            str(paths.interceptor_marker()),
            "Readiness marker written once the interceptor is listening.",
        )

    def configure(self, updated: set[str]) -> None:
        if "secure_proxy_ready_marker" in updated:
            self._remove_marker()

    def _remove_marker(self) -> None:
        marker = Path(ctx.options.secure_proxy_ready_marker)
        try:
            marker.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove stale readiness marker {}: {}", marker, exc)

    def running(self) -> None:
        confdir = Path(os.path.expanduser(ctx.options.confdir))
        cert = (confdir / CA_CERT_NAME).read_bytes()
        target = Path(ctx.options.secure_proxy_ca_cert)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, cert, 0o644)
        proxyserver = ctx.master.addons.get("proxyserver")
        listening = [list(a[:2]) for a in proxyserver.listen_addrs()] if proxyserver else []
        marker = Path(ctx.options.secure_proxy_ready_marker)
        marker.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "listening": listening, "ca_cert": str(target)}
        write_atomic(marker, (json.dumps(info) + "\n").encode(), 0o644)
        pool.announce_ready()
        logger.info("interceptor ready: listening on {}, CA at {}", listening, target)

    def done(self) -> None:
        with contextlib.suppress(Exception):
            self._remove_marker()
