"""`python -m runtime.host.sandbox --inner`: what the sandbox engine execs as PID 1
of its namespaces (runtime.host.sandbox.launch); nothing else calls it."""

from __future__ import annotations

import sys

from runtime.host.sandbox.inside import inner

if sys.argv[1:] == ["--inner"]:
    sys.exit(inner())
print(
    "usage: python -m runtime.host.sandbox --inner (started by copilot_here --engine sandbox)",
    file=sys.stderr,
)
sys.exit(2)
