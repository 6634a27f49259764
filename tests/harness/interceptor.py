"""The interceptor as the end-to-end tests run it.

    ic = Interceptor(topo, uid=64101, source=staged_source, work=work,
                     policy_file=..., log_file=..., upstream_ca=ca.ca_cert).start()
    ...
    ic.kill9(); ic.start()   # a new process, the same files

`python -m runtime.container.interceptor` runs as an unprivileged uid inside the
box namespace; start() returns once its readiness marker names the new process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

from .netns import Topology
from .source import python_bin


@dataclass
class Interceptor:
    topo: Topology
    uid: int
    source: str  # PYTHONPATH of the staged runtime
    policy_file: Path
    log_file: Path
    confdir: Path
    proxy_ca: Path  # where it publishes its CA, as clients see it
    marker: Path
    err_path: Path  # its stdout and stderr
    upstream_ca: Path | None = None
    proc: Popen[Any] | None = field(default=None, init=False)

    @property
    def argv(self) -> list[str]:
        return [
            *(python_bin(), "-m", "runtime.container.interceptor"),
            *("--policy", str(self.policy_file), "--confdir", str(self.confdir)),
            *("--traffic-log", str(self.log_file), "--ca-cert", str(self.proxy_ca)),
            *("--ready-marker", str(self.marker), "--verbosity", "info"),
        ]

    def start(self, timeout: float = 30) -> Interceptor:
        env = {"PYTHONPATH": self.source}
        if self.upstream_ca is not None:
            env["SECURE_PROXY_UPSTREAM_CA"] = str(self.upstream_ca)
        with self.err_path.open("a") as err:
            self.proc = self.topo.box_popen(
                self.argv, user=self.uid, env=env, stdout=err, stderr=err
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"interceptor did not start: {self.err_path.read_text()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        try:
            info = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        return info.get("pid") == self.proc.pid  # setpriv execs: the pid is the interceptor's

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def errors(self) -> str:
        return self.err_path.read_text()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc)
