"""`--engine sandbox`: the container without a container engine.

The same init runs as PID 1 in new Linux namespaces (net, mount, pid, uts,
ipc), as root, built only from util-linux (`unshare`, `nsenter`) and iproute2:

    host (network.py, launch.py)            sandbox (inside.py; PID 1 = secure-proxy-init)
    ----------------------------            ----------------------------------------------
    ip netns add spsbx-<id>                 / = overlay(lower: host /, upper: tmpfs)
    veth eth0 <-> uplink                    /proc new, /dev bound, /run /tmp /home tmpfs
      (host + NAT, or --sandbox-netns NS)   /work, /work/.copilot_here, /logs bound
    nsenter --net unshare --mount --pid     runtime laid by runtime.install (reused venv)
      python -m runtime.host.sandbox --inner

Every write the sandbox makes to /etc, /run, /ca, /home, /usr/local, /opt and
/var lands in the overlay's tmpfs upper layer and disappears with the mount
namespace: users, the CA store and policy never touch the host. Only the bind
mounts (project, config dirs, logs dir) are shared, as with Docker volumes.
The only host state created is the network namespace, a veth pair and (NAT
mode) two iptables rules, all removed at exit; leftovers of a killed run are
removed by the next one.

Importing this package loads the host side only (no ctypes, no mounts).
"""

from __future__ import annotations

from runtime.host.sandbox.launch import preflight, run
from runtime.host.sandbox.network import cleanup_leftovers
from runtime.host.sandbox.spec import Mount, SandboxError, Spec

__all__ = ["Mount", "SandboxError", "Spec", "cleanup_leftovers", "preflight", "run"]
