"""How much the firewall does, from the compiled policy. Pure, and cheap to import:
the init decides with it before anything else (firewall.ruleset re-exports it).

    none       rules disabled, no log: no rule of ours at all (the network untouched)
    intercept  rules disabled, log on: TCP 80/443 to the interceptor, all else untouched
    full       rules enabled: the lock, and DNS through the DNS guard
"""

from __future__ import annotations

from enum import StrEnum

from runtime.core.policy import Mode, Policy


class LockLevel(StrEnum):
    NONE = "none"
    INTERCEPT = "intercept"
    FULL = "full"


def lock_level(policy: Policy) -> LockLevel:
    if policy.mode is not Mode.ALLOW_ALL:
        return LockLevel.FULL
    return LockLevel.INTERCEPT if policy.log_to_file else LockLevel.NONE
