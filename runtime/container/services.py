"""Which services run at each firewall level, and the move from one level to another.

    level (firewall.ruleset)   firewall   interceptor   dnsguard   portkeeper
    none       (inactive)      -          -             -          -
    intercept  (log only)      yes        yes           -          -
    full       (rules)         yes        yes           yes        yes

With a writable config (--network-config-write) the level alone decides which
programs run: the reloader applies edits live, may raise the level and lower it
again (switch()), and an edit may add a `ports` rule, so the port keeper runs at
level full even while no rule has ports. A read-only config fixes the policy for
the run: no reloader, and the port keeper only when a rule has ports (started()).
Each is a Python process importing for ~0.1 s of CPU at start on the container's
cores, the start-up's critical resource (BENCHMARKS.md section 17).

The log guard runs whenever supervisord does. supervisord runs when the level is
not none, or when the config is writable.

supervisord.conf's programs take `autostart` from the SECURE_PROXY_START_<NAME>
variables the init gives it (autostart_env()), so one set of program files
serves every level.

The interceptor is one supervisord program whose process forks N workers (the
config's `workers`, resolved once by the init into WORKERS_ENV, which supervisord,
the firewall and the reloader inherit; interceptor/pool.py): worker n on port
58080+n with its own marker. Ready means all N ready; a reload signals the pool,
which passes it to all N.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from firewall.level import LockLevel
from runtime import paths
from runtime.container import supervisor
from runtime.container.console import SetupFailed
from runtime.core.config import AUTO_WORKERS_MAX

#: The number of interceptor workers for this run (supervisor.d/interceptor.conf's
#: --workers, the firewall's --workers): set by the init, inherited by everything after.
WORKERS_ENV = "SECURE_PROXY_INTERCEPTOR_WORKERS"

FIREWALL_TIMEOUT = float(os.environ.get("SECURE_PROXY_FIREWALL_TIMEOUT", "30"))
INTERCEPTOR_TIMEOUT = float(os.environ.get("SECURE_PROXY_INTERCEPTOR_TIMEOUT", "60"))
DNSGUARD_TIMEOUT = float(os.environ.get("SECURE_PROXY_DNSGUARD_TIMEOUT", "30"))
PORTKEEPER_TIMEOUT = float(os.environ.get("SECURE_PROXY_PORTKEEPER_TIMEOUT", "30"))

#: every program of supervisor.d, in start order
PROGRAMS = ("firewall", "logguard", "portkeeper", "dnsguard", "interceptor", "reloader")

#: the long-running network services of each level (the firewall is a one-shot)
SERVICES: dict[LockLevel, tuple[str, ...]] = {
    LockLevel.NONE: (),
    LockLevel.INTERCEPT: ("interceptor",),
    LockLevel.FULL: ("portkeeper", "dnsguard", "interceptor"),
}


def started(level: LockLevel, live: bool = True, ports: bool = True) -> tuple[str, ...]:
    """The level's services this run starts. `live`: the config is writable, so the
    policy may change during the run; `ports`: a rule of the policy has `ports`. Only
    a fixed policy without ports leaves the port keeper out: it would open nothing."""
    if live or ports:
        return SERVICES[level]
    return tuple(name for name in SERVICES[level] if name != "portkeeper")


def autostart_env(level: LockLevel, live: bool = True, ports: bool = True) -> dict[str, str]:
    """SECURE_PROXY_START_<PROGRAM>=true|false for supervisord.conf's `autostart`."""
    on = {"logguard", *started(level, live, ports)}
    if live:
        on.add("reloader")
    if level is not LockLevel.NONE:
        on.add("firewall")
    return {f"SECURE_PROXY_START_{name.upper()}": str(name in on).lower() for name in PROGRAMS}


def available_cores() -> int:
    """The cores this container may run on: its CPU affinity (docker --cpuset-cpus),
    lowered by a cgroup v2 CPU quota (docker --cpus), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def resolve_workers(configured: int | None) -> int:
    """The config's `workers`: its number, or for "auto" (None) the cores, at most
    AUTO_WORKERS_MAX (more processes than cores only add memory and start-up)."""
    if configured is not None:
        return configured
    return min(available_cores(), AUTO_WORKERS_MAX)


def workers() -> int:
    """This run's interceptor processes (WORKERS_ENV; 1 outside a run the init set up)."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1


def components(name: str) -> list[supervisor.Component]:
    """What readiness means for one program: its marker (the interceptor: N of them)."""
    if name == "firewall":
        return [supervisor.Component(name, paths.firewall_marker(), FIREWALL_TIMEOUT, True)]
    if name == "interceptor":
        return [
            supervisor.Component(name, paths.interceptor_marker(n), INTERCEPTOR_TIMEOUT, False)
            for n in range(workers())
        ]
    if name == "dnsguard":
        return [supervisor.Component(name, paths.dnsguard_marker(), DNSGUARD_TIMEOUT, False)]
    if name == "portkeeper":
        return [supervisor.Component(name, paths.portkeeper_marker(), PORTKEEPER_TIMEOUT, False)]
    raise ValueError(f"no readiness marker for {name}")


def readiness(
    level: LockLevel, live: bool = True, ports: bool = True
) -> list[supervisor.Component]:
    """What the command waits for at start: the verified lock and every service started
    (started())."""
    if level is LockLevel.NONE:
        return []
    return [c for name in ("firewall", *started(level, live, ports)) for c in components(name)]


def signal_services(level: LockLevel) -> list[str]:
    """SIGHUP to the level's services: they re-read policy.json. Returns the failures
    (a service that cannot be signalled loads the policy when it next starts)."""
    failed = []
    for name in SERVICES[level]:
        try:
            supervisor.signal_process(name, "HUP")
        except supervisor.RPC_ERRORS as exc:
            failed.append(f"{name}: {exc}")
    return failed


#: The levels, least strict first.
LEVELS = (LockLevel.NONE, LockLevel.INTERCEPT, LockLevel.FULL)


class ServicesDown(SetupFailed):
    """switch: the firewall is at the new, stricter level, but its services are not up."""


def move_firewall(new: LockLevel) -> None:
    """Re-apply the firewall (it reads the level from policy.json); SetupFailed if it
    cannot."""
    why = supervisor.run_once("firewall", FIREWALL_TIMEOUT)
    if why is not None:
        raise SetupFailed(
            f"the firewall could not move to level {new.value}: {why} "
            f"(log: {paths.component_log('firewall')})"
        )


def switch(old: LockLevel, new: LockLevel) -> None:
    """From one level to another, after policy.json changed. Raises SetupFailed.

    New services start (and are ready) before the firewall sends traffic to them;
    the firewall is re-applied at the new level (it reads the level from
    policy.json; at none it removes our chains); services the new level does not
    use stop after the firewall no longer sends them anything. So the command's
    traffic meets the new level from the moment the firewall is applied. When the
    services of a stricter level cannot start, the firewall moves anyway (fail closed)
    and ServicesDown says so.
    """
    starting = [name for name in SERVICES[new] if name not in SERVICES[old]]
    staying = [name for name in SERVICES[new] if name in SERVICES[old]]
    stricter = LEVELS.index(new) > LEVELS.index(old)
    try:
        for name in starting:
            # A marker left by an earlier run of the program at this level (stopped when
            # the level was lowered) would pass for its readiness before it listens.
            for component in components(name):
                with contextlib.suppress(FileNotFoundError):
                    component.marker.unlink()
            supervisor.start_program(name)
        supervisor.wait_ready(
            [c for name in starting for c in components(name)], time.sleep, backoff_fails=stricter
        )
    except (SetupFailed, *supervisor.RPC_ERRORS) as exc:
        if not stricter:
            raise
        # A stricter level whose services cannot start (the agent, free at the old
        # level, may hold their ports first): the firewall moves to it all the same,
        # so traffic fails closed instead of staying free for the rest of the run
        # (supervisord keeps retrying the services; once up they serve).
        for name in staying:
            with contextlib.suppress(*supervisor.RPC_ERRORS):
                supervisor.signal_process(name, "HUP")
        move_firewall(new)
        raise ServicesDown(
            f"level {new.value} is in force but its services did not start ({exc}); "
            "traffic to them fails closed"
        ) from exc
    for name in staying:
        supervisor.signal_process(name, "HUP")
    move_firewall(new)
    for name in SERVICES[old]:
        if name not in SERVICES[new]:
            supervisor.stop_program(name)
