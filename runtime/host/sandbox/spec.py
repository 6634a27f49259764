"""What the host hands to the sandbox's PID 1: the run's spec, and the one way both
sides run a tool (util-linux, iproute2, iptables)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field

from runtime import paths

HOSTNAME = "copilot-here"


class SandboxError(Exception):
    pass


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass
class Spec:
    command: list[str]
    mounts: list[Mount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    add_hosts: list[tuple[str, str]] = field(default_factory=list)
    netns: str | None = None
    reuse_venv: str = field(default_factory=lambda: str(paths.sandbox_venv()))
    source: str = field(default_factory=lambda: str(paths.source_root()))
    stage: str = ""
    run_id: str = ""
    cap_drop: list[str] = field(default_factory=list)
    # Variables whose values the launcher's environment carries, never the spec (which
    # a dry run prints, and which is in the environment of the processes up to init).
    env_by_name: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data = json.loads(text)
        data["mounts"] = [Mount(**m) for m in data["mounts"]]
        data["add_hosts"] = [tuple(h) for h in data["add_hosts"]]
        return cls(**data)


def run_tool(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise SandboxError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
