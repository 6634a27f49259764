"""The policy in force: loaded from the `secure_proxy_policy` option, reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any, Optional

from loguru import logger
from mitmproxy import ctx, exceptions

from runtime import paths
from runtime.core.policy import Mode, Policy
from runtime.policyfile import read_policy

#: Until a policy is loaded nothing is allowed (and the interceptor does not start).
NO_POLICY = Policy.build(Mode.ENFORCE, True, (), "no policy loaded (interceptor misconfigured)")

#: What reading policy.json may raise when the file is missing or broken.
UNUSABLE = (OSError, ValueError, KeyError, TypeError)


class PolicyStore:
    """Holds the compiled policy (policy.json) every other addon reads.

    `configure` loads it whenever the `secure_proxy_policy` option is set, and
    fails with OptionsError if it cannot: the interceptor never starts without
    a policy. SIGHUP reads the file again and swaps the policy in one
    assignment; a missing or broken file then keeps the policy in force and
    says why. Each request reads `policy` once, so it is judged by one policy.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy: Policy = policy or NO_POLICY
        self._loop: asyncio.AbstractEventLoop | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "secure_proxy_policy",
            Optional[str],  # noqa: UP045 (mitmproxy compares typespecs with this form)
            None,
            f"Compiled policy to enforce (the init writes {paths.policy_file()}); "
            "read again on SIGHUP. Unset, nothing is allowed.",
        )

    def configure(self, updated: set[str]) -> None:
        if "secure_proxy_policy" not in updated:
            return
        if ctx.options.secure_proxy_policy is None:  # unset (or rolled back to unset)
            self.policy = NO_POLICY
            return
        path = Path(ctx.options.secure_proxy_policy)
        try:
            self.policy = read_policy(path)
        except UNUSABLE as exc:
            raise exceptions.OptionsError(
                f"cannot load the policy {path} ({type(exc).__name__}: {exc}); the init "
                "writes it before starting the interceptor (secure-proxy-init, or --policy). "
                "Not starting: traffic stays blocked (fail closed)."
            ) from exc
        logger.info(
            "policy loaded from {}: mode {}, {} rules, source {}",
            path,
            self.policy.mode.value,
            len(self.policy.rules),
            self.policy.source,
        )

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._loop = loop

    def reload(self) -> bool:
        if ctx.options.secure_proxy_policy is None:
            logger.error("policy reload: no policy file set (--policy); nothing is allowed")
            return False
        path = Path(ctx.options.secure_proxy_policy)
        try:
            policy = read_policy(path)
        except FileNotFoundError:
            logger.error("policy reload: {} is missing; keeping the policy in force", path)
            return False
        except UNUSABLE as exc:
            logger.error(
                "policy reload: {} is unusable ({}: {}); keeping the policy in force",
                path,
                type(exc).__name__,
                exc,
            )
            return False
        self.policy = policy
        logger.info(
            "policy reloaded from {}: mode {}, {} rules, source {}",
            path,
            policy.mode.value,
            len(policy.rules),
            policy.source,
        )
        return True

    def done(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None
