"""policy.json: the compiled policy the init and the reloader write, and the services
(firewall, interceptor, DNS guard, port keeper) read.

Apart from runtime.resolve (which finds and compiles the config) on purpose: the
services only read the result, and importing the config machinery cost each of them
~18 ms of CPU at start, all at once on the container's cores.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime import fsutil, paths
from runtime.core.policy import Policy


def write_policy(policy: Policy, target: Path | None = None) -> Path:
    """Write policy.json atomically (temp file in the same directory, then rename)."""
    text = json.dumps(policy.to_json(), indent=1) + "\n"
    return fsutil.atomic_write(target or paths.policy_file(), text, 0o644)


def read_policy(path: Path | None = None) -> Policy:
    path = path or paths.policy_file()
    return Policy.from_json(json.loads(path.read_text()))
