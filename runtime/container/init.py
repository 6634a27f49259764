"""secure-proxy-init: PID 1 of the container.

main() is the start-up as a straight line of phases, then the wait and the end:

    read config  resolve + validate + compile; an invalid config stops here. The
                 plan: the firewall level the policy asks for (firewall.level) and
                 whether the config may change it during the run (writable)
    ids          PUID/PGID and the app user's ids (never root, never proxy-user)
    services     only when the level is not none or the config is writable: a fresh
                 run dir, supervisord with the programs of the level (services.py),
                 which import meanwhile; then what they read: the CA made and
                 published (ca.py), policy.json, session.json (session.py), /logs
                 for the interceptor
    sign-in      the token (taken out of the environment first thing) swapped for a
                 placeholder when rules are enabled, the pair for the interceptor
                 alone (signin.py); then the `prepared` marker: the programs, which
                 wait for it after their import (launch.py), go on
    appuser      created from PUID/PGID while the services start (users.py)
    trust        the CA for every client, while the services start (ca.py)
    readiness    the firewall's verified lock and every service's marker; fail closed
    launch       the command, last (command.py)
    wait         signals forwarded to it, zombies reaped, until it exits
    finish       its leftovers ended (leftovers.py), supervisord stopped, the log
                 handed over to PUID:PGID; the exit code is the command's (128+N
                 when signal N killed it)

Inactive (no config, or rules disabled without a log, and the config read-only):
no firewall, no interceptor, no CA, no supervisord; one line says so and the
command runs on an untouched network (NET_ADMIN not needed).

Signals are taken synchronously (signals.py): one that arrives during the start-up
aborts it at the next phase boundary, with 128+N. A start-up that fails (SetupFailed,
or an OSError: a file it must write cannot be) ends the same way, with 1: supervisord
and its services stopped, /logs handed back if it was taken, the command never run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from firewall.level import LockLevel, lock_level
from runtime import paths
from runtime.container import command, leftovers, signals, signin, users
from runtime.container.console import SetupFailed, say, trace
from runtime.container.launch import PREPARED_ENV
from runtime.container.session import Session, read_only
from runtime.container.signals import Interrupted
from runtime.core.config import ConfigError
from runtime.core.policy import Mode
from runtime.policyfile import write_policy
from runtime.resolve import (
    BUILT_IN,
    GLOBAL,
    REPO,
    Resolved,
    resolve,
    values_from_environ,
)

if TYPE_CHECKING:
    from runtime.container import supervisor

# What only a supervised run needs (ca, logguard, services, supervisor) is
# imported where it is used: an inactive start stays a few imports (BENCHMARKS.md).

EXIT_SETUP = 1


@dataclass
class Run:
    """What the end of the run needs to know about how far the start got."""

    sup: subprocess.Popen[bytes] | None = None
    waking: threading.Thread | None = None  # supervisor.wake_when_listening
    reaped: dict[int, int] = field(default_factory=dict)
    app_uid: int | None = None
    logs_prepared: bool = False  # from then on /logs may be proxy-user's: hand it back


@dataclass(frozen=True)
class Plan:
    """What this run sets up, decided by the config alone."""

    level: LockLevel
    writable: bool  # --network-config-write: an edit may raise the level later
    ports: bool = False  # a rule opens non-HTTP ports (the port keeper's work)

    @property
    def supervised(self) -> bool:
        return self.level is not LockLevel.NONE or self.writable

    @classmethod
    def of(cls, resolved: Resolved) -> Plan:
        path = resolved.path
        return cls(
            lock_level(resolved.policy),
            path is not None and not read_only(path.parent),
            any(rule.ports for rule in resolved.policy.rules),
        )


@dataclass(frozen=True)
class Ids:
    puid: int
    pgid: int
    app_uid: int
    app_gid: int
    proxy: tuple[int, int]


def checkpoint(done: str) -> None:
    """Between two phases: the timing, and an abort if a signal came."""
    trace(done)
    signals.check()


# ----------------------------------------------------------------------------- phases


def describe(resolved: Resolved, plan: Plan, host_log_dir: str | None = None) -> list[str]:
    """The [Network] lines: one when inactive, else source, rules and log."""
    source = {
        REPO: f"repo config {resolved.path}",
        GLOBAL: f"global config {resolved.path}",
        BUILT_IN: "no config found",
    }[resolved.kind]
    if plan.level is LockLevel.NONE:
        line = f"[Network] Inactive ({source}): allow-all, nothing logged, network untouched"
        if plan.writable:
            line += "; enabling rules or the log in the config takes effect live"
        return [line]
    lines = {
        REPO: f"[Network] Using repo config: {resolved.path}",
        GLOBAL: f"[Network] Using global config: {resolved.path}",
        BUILT_IN: "[Network] No config found, using allow-all defaults",
    }
    out = [lines[resolved.kind]]
    policy = resolved.policy
    if policy.mode is Mode.ALLOW_ALL:
        out.append(
            "[Network] Rules DISABLED (allow-all mode, log_to_file: true): "
            "web traffic (TCP 80/443) logged, all else untouched"
        )
    else:
        out.append(f"[Network] Rules ENABLED (mode: {policy.mode.value})")
    if policy.log_to_file:
        where = f" (on the host: {host_log_dir.rstrip('/')}/traffic.jsonl)" if host_log_dir else ""
        out.append(f"[Network] Traffic log: {paths.traffic_log()}{where}")
    note = resolved.repository_note()  # the {{GITHUB_OWNER}}/{{GITHUB_REPO}} rules
    if note:
        out.append(f"[Network] {note}")
    return out


def read_config() -> tuple[Resolved, Plan]:
    try:
        # The project's GitHub repository, from the host's approved origin remote.
        values = values_from_environ()
        resolved = resolve(paths.container_project_dir(), paths.CONTAINER_HOME, values=values)
    except ConfigError as exc:
        raise SetupFailed(f"Invalid network config; the container does not start.\n{exc}") from None
    plan = Plan.of(resolved)
    for line in describe(resolved, plan, os.environ.get("SECURE_PROXY_HOST_LOG_DIR")):
        say(line)
    return resolved, plan


def read_ids() -> Ids:
    puid, pgid = users.host_ids()
    proxy = users.proxy_ids()
    uid, gid = users.app_ids(puid, pgid, proxy[0])
    return Ids(puid, pgid, uid, gid, proxy)


def prepare_run_dir(proxy: tuple[int, int]) -> None:
    """Fresh state per container start: no stale marker can claim readiness."""
    run = paths.run_dir()
    run.mkdir(parents=True, exist_ok=True)
    os.chmod(run, 0o755)
    own = paths.interceptor_run_dir()
    own.mkdir(exist_ok=True)
    os.chown(own, *proxy)
    os.chmod(own, 0o755)
    stale = (
        paths.prepared_marker(),
        paths.firewall_marker(),
        *paths.interceptor_markers(),
        paths.dnsguard_marker(),
        paths.portkeeper_marker(),
        paths.credentials_file(),
    )
    for path in (*stale, paths.ca_cert()):
        path.unlink(missing_ok=True)
    paths.component_log_dir().mkdir(parents=True, exist_ok=True)


def digest(path: Path | None) -> str | None:
    if path is None:
        return None
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def write_session(resolved: Resolved, ids: Ids, workers: int) -> None:
    Session(
        config_kind=resolved.kind,
        config_path=resolved.path,
        config_sha256=digest(resolved.path),
        puid=ids.puid,
        pgid=ids.pgid,
        app_uid=ids.app_uid,
        app_gid=ids.app_gid,
        workers=workers,
    ).write()


def start_services(plan: Plan, resolved: Resolved, ids: Ids, run: Run) -> None:
    """supervisord, as early as the config allows: its programs import (0.1-0.4 s of
    CPU each) while the init prepares what they read, which they wait for after their
    import (services_prepared(); runtime.container.launch). The second core would
    otherwise idle through the CA, the policy and the session (BENCHMARKS.md)."""
    if not plan.supervised:
        return
    from runtime.container import services, supervisor

    # The interceptor's workers, fixed for the run: the interceptor's --workers, the
    # firewall's ports and the readiness all read this one number.
    workers = services.resolve_workers(resolved.config.workers)
    os.environ[services.WORKERS_ENV] = str(workers)
    trace(f"{workers} interceptor process(es)")
    prepare_run_dir(ids.proxy)
    env = {**os.environ, **services.autostart_env(plan.level, plan.writable, plan.ports)}
    env[PREPARED_ENV] = str(paths.prepared_marker())
    run.sup = supervisor.start(env)
    run.waking = supervisor.wake_when_listening()
    checkpoint("supervisord started")


def prepare_services(plan: Plan, resolved: Resolved, ids: Ids, run: Run) -> bytes | None:
    """Everything the services read at start; the CA's certificate."""
    if not plan.supervised:
        return None
    from runtime.container import ca, logguard, services

    pem = ca.make_ca(ids.proxy)
    checkpoint("CA made")
    write_policy(resolved.policy)
    write_session(resolved, ids, services.workers())
    logguard.check_log_place(os.environ.get("SECURE_PROXY_HOST_LOG_DIR"))  # /logs untouched
    run.logs_prepared = True
    logguard.prepare()
    checkpoint("policy, session and logs prepared")
    return pem


def services_prepared(plan: Plan) -> None:
    """The services' go: the policy, the session, the CA, the logs and the sign-in
    tokens are in place (each written whole before this)."""
    if plan.supervised:
        paths.prepared_marker().touch()
        checkpoint("services prepared")


def sign_in(plan: Plan, ids: Ids, tokens: signin.Tokens) -> signin.Tokens:
    """With rules enabled the command gets placeholders and the interceptor the tokens
    (before it starts); otherwise the tokens as they came (runtime.container.signin)."""
    if plan.level is LockLevel.FULL and tokens.by_name and not tokens.pass_through:
        signin.swap(tokens, ids.proxy)
        kept = sorted(n for n, v in tokens.by_name.items() if v not in tokens.placeholders)
        if kept:
            say(
                f"[Network] Sign-in: {', '.join(kept)} too short to stand in for "
                "with a placeholder: the agent gets it itself"
            )
        checkpoint("sign-in token swapped for a placeholder")
    return tokens


def trust(ids: Ids, pem: bytes | None) -> dict[str, str]:
    """The CA for the command's clients (made also when inactive but writable: a
    later edit may start the interceptor, and the command reads its CA only now)."""
    if pem is None:
        return {}
    from runtime.container import ca

    env = ca.trust_ca(ids.app_uid, ids.app_gid, pem)
    checkpoint("CA trusted")
    return env


def wait_ready(plan: Plan, run: Run, pem: bytes | None) -> None:
    if plan.level is LockLevel.NONE or pem is None:
        return
    from runtime.container import ca, services, supervisor

    supervisor.wait_ready(
        services.readiness(plan.level, plan.writable, plan.ports), signals.check, run.sup
    )
    ca.check_published_ca(pem)
    checkpoint(f"ready at level {plan.level.value}")


def wait(child: subprocess.Popen[bytes], run: Run) -> int:
    """Forward signals to the command and reap zombies until it exits; its exit code."""
    watch: supervisor.CrashWatch | None = None
    if run.sup:
        from runtime.container import supervisor

        watch = supervisor.CrashWatch()
        watch.start()
    told_sup = False
    try:
        while True:
            signum = signals.next_signal()
            if signum != signal.SIGCHLD:
                if child.pid not in run.reaped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)
                continue
            leftovers.reap_zombies(run.reaped)
            if child.pid in run.reaped:
                return command.exit_code(run.reaped[child.pid])
            if run.sup is not None and run.sup.pid in run.reaped and not told_sup:
                say(
                    "\n[Network] supervisord exited, its services with it; a firewall in "
                    "place stays, so the traffic it sends them fails (fail closed)."
                )
                told_sup = True
    finally:
        if watch:
            watch.stop.set()


def finish(run: Run) -> None:
    """The end: the command's leftovers, then supervisord, then the hand-over.

    The hand-over is the last step and happens only when no process but the init
    is left: the log then belongs to the uid the command ran with, and nothing of
    the command may still be there to write to it. Signals stay blocked, so none
    cuts this short.
    """
    keep = run.sup.pid if run.sup else None
    clean = leftovers.end_processes(keep, run.app_uid, run.reaped, leftovers.KILL_GRACE)
    trace("command's processes gone" if clean else "command's processes NOT all gone")
    if run.sup is not None:
        from runtime.container import supervisor

        supervisor.stop(run.sup, run.reaped)
        trace("supervisord stopped")
    clean = leftovers.end_processes(None, run.app_uid, run.reaped, 0.0) and clean
    if not run.logs_prepared:
        return
    if not clean:
        say(
            "[Network] Some processes could not be ended; the traffic log was not handed "
            f"over and still belongs to {paths.PROXY_USER}'s uid."
        )
        return
    from runtime.container import logguard

    try:
        done = logguard.hand_over()
    except (logguard.HandOverError, OSError) as exc:
        say(f"[Network] The traffic log was not handed over: {exc}")
        return
    trace(f"handed over: {', '.join(done)}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if os.geteuid() != 0:
        say("secure-proxy-init must run as root (it is the container's entrypoint)")
        return EXIT_SETUP
    trace("started")
    # First of all: the token leaves the environment every child inherits.
    tokens = signin.take(os.environ)
    signals.block()
    if os.getpid() != 1:
        leftovers.become_subreaper()
    run = Run()
    try:
        resolved, plan = read_config()
        ids = read_ids()
        run.app_uid = ids.app_uid
        checkpoint("config read")
        start_services(plan, resolved, ids, run)
        pem = prepare_services(plan, resolved, ids, run)
        sign_in(plan, ids, tokens)
        services_prepared(plan)
        name = users.ensure_appuser(ids.app_uid, ids.app_gid)
        checkpoint("appuser ready")
        ca_env = trust(ids, pem)
        wait_ready(plan, run, pem)
        if run.waking is not None:
            run.waking.join()  # the command's fork runs Python (preexec_fn): no thread of ours
        child = command.launch(
            argv or command.default_command(),
            ids.app_uid,
            ids.app_gid,
            command.user_env(name, {**ca_env, **tokens.for_command()}),
        )
    except SetupFailed as exc:
        say(f"[Network] {exc}")
        finish(run)
        return EXIT_SETUP
    except OSError as exc:
        # A file the start-up writes (the CA, the policy, the session, /logs, the sign-in
        # pairs) cannot be: supervisord runs by then, so the same orderly end as any
        # failed start (services stopped, /logs handed back), not a traceback and the
        # services left to the kernel.
        say(f"[Network] The start-up failed, the command was not started: {exc}")
        finish(run)
        return EXIT_SETUP
    except Interrupted as exc:
        finish(run)
        return 128 + exc.signum
    code = wait(child, run)
    command.reclaim_terminal()
    trace(f"command exited ({code})")
    finish(run)
    return code


def entrypoint() -> NoReturn:
    """The console script: main(), then out at once. PID 1 has nothing to finalise
    once the command and its leftovers are gone, and the interpreter's own shutdown
    would add ~15 ms to every start (BENCHMARKS.md)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
