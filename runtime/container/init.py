"""secure-proxy-init: PID 1 of the container.

    1. resolve + validate + compile the config (an invalid config stops here)
    2. write policy.json, prepare /logs, start supervisord (own session, stdin /dev/null)
    3. create appuser from PUID/PGID while the services start
    4. wait (bounded) for the firewall's verified marker and the interceptor's
       ready marker; fail closed, naming the component and its log, if either fails
    5. trust the interceptor's CA (system store, env vars, NSS where a browser exists)
    6. run the user command LAST: as appuser, no_new_privs, empty capability
       bounding set, in the terminal's foreground; forward signals, reap zombies
    7. when it exits: end every process it left (in the background, setsid,
       double-forked: every process of the PID namespace but init and
       supervisord's tree; SIGTERM, a short grace, SIGKILL) and wait until none
       remains; stop supervisord; hand /logs and the traffic log to PUID:PGID
       (by descriptor, those two files only); exit with the command's code
       (128+N when it died of signal N). Nothing of the command outlives the
       hand-over, so nothing of it can write to the log once it is the host
       user's (whose uid the command runs with).

supervisord gives its children pipes and always exits 0, so this small init,
not supervisord, owns the terminal and the exit code (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

from runtime import paths
from runtime.container import logguard
from runtime.core.config import ConfigError
from runtime.core.policy import Mode
from runtime.resolve import (
    BUILT_IN,
    GLOBAL,
    REPO,
    Resolved,
    resolve,
    values_from_environ,
    write_policy,
)

EXIT_SETUP = 1
FIREWALL_TIMEOUT = float(os.environ.get("SECURE_PROXY_FIREWALL_TIMEOUT", "30"))
INTERCEPTOR_TIMEOUT = float(os.environ.get("SECURE_PROXY_INTERCEPTOR_TIMEOUT", "60"))
STOP_TIMEOUT = 8.0
KILL_GRACE = float(os.environ.get("SECURE_PROXY_KILL_GRACE", "1.0"))
KILL_TIMEOUT = 5.0
DEFAULT_ID = 1000
CA_KEY_SIZE = 2048  # mitmproxy's default key_size
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


_T0 = time.monotonic()


def trace(stage: str) -> None:
    """Stage timings on stderr with SECURE_PROXY_TRACE=1 (startup time is user-visible)."""
    if os.environ.get("SECURE_PROXY_TRACE") == "1":
        print(f"[init +{time.monotonic() - _T0:.2f}s] {stage}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    """Status lines go to stderr so the command's stdout stays the command's."""
    print(message, file=sys.stderr, flush=True)


class SetupFailed(Exception):
    """Startup cannot continue; the message tells the user what failed and how to fix it."""


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------- config


def describe(resolved: Resolved, host_log_dir: str | None = None) -> list[str]:
    lines = {
        REPO: f"[Network] Using repo config: {resolved.path}",
        GLOBAL: f"[Network] Using global config: {resolved.path}",
        BUILT_IN: "[Network] No config found, using allow-all defaults",
    }
    out = [lines[resolved.kind]]
    policy = resolved.policy
    if policy.mode is Mode.ALLOW_ALL:
        log = "true" if policy.log_to_file else "false"
        out.append(f"[Network] Rules DISABLED (allow-all mode, log_to_file: {log})")
    else:
        out.append(f"[Network] Rules ENABLED (mode: {policy.mode.value})")
    if policy.log_to_file:
        where = f" (on the host: {host_log_dir.rstrip('/')}/traffic.jsonl)" if host_log_dir else ""
        out.append(f"[Network] Traffic log: {paths.traffic_log()}{where}")
    note = resolved.repository_note()  # the {{GITHUB_OWNER}}/{{GITHUB_REPO}} rules
    if note:
        out.append(f"[Network] {note}")
    return out


def compile_config() -> Resolved:
    # The project's GitHub repository, from the host's approved origin remote.
    values = values_from_environ()
    return resolve(paths.container_project_dir(), paths.CONTAINER_HOME, values=values)


def digest(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# ----------------------------------------------------------------------------- ids


def host_ids() -> tuple[int, int]:
    def read(name: str) -> int:
        raw = os.environ.get(name, "").strip()
        try:
            return int(raw) if raw else DEFAULT_ID
        except ValueError:
            raise SetupFailed(f"{name}={raw!r} is not a number; pass a numeric id") from None

    return read("PUID"), read("PGID")


def app_ids(puid: int, pgid: int, proxy_uid: int | None = None) -> tuple[int, int]:
    """The user command never runs as root: id 0 (the CLI run by root) becomes 1000.

    Nor as the proxy user: the firewall lets that uid out directly, so a command
    running with it would bypass the interceptor. That is refused, not remapped,
    so the files the user writes never end up owned by a surprising uid.
    """
    uid, gid = (puid or DEFAULT_ID), (pgid or DEFAULT_ID)
    if proxy_uid is not None and uid == proxy_uid:
        raise SetupFailed(
            f"PUID={uid} is the uid of {paths.PROXY_USER}, whose traffic bypasses the "
            "interceptor; run with another PUID (your host user's id, e.g. PUID=$(id -u))"
        )
    return uid, gid


def proxy_uid() -> int:
    try:
        return pwd.getpwnam(paths.PROXY_USER).pw_uid
    except KeyError:
        raise SetupFailed(
            f"user {paths.PROXY_USER} does not exist; the image's installer creates it "
            "(python3 -m runtime.install)"
        ) from None


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SetupFailed(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def ensure_appuser(uid: int, gid: int) -> str:
    """appuser with uid:gid, reusing an existing group with that gid and renaming an
    existing user with that uid (the node image ships `node` as 1000)."""
    name = paths.APP_USER
    home = str(paths.CONTAINER_HOME)
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    try:
        grp.getgrgid(gid)
    except KeyError:
        try:
            grp.getgrnam(name)
            _run(["groupmod", "-g", str(gid), name])
        except KeyError:
            _run(["groupadd", "-g", str(gid), name])
    try:
        entry = pwd.getpwnam(name)
        if (entry.pw_uid, entry.pw_gid) != (uid, gid) or entry.pw_dir != home:
            _run(["usermod", "-o", "-u", str(uid), "-g", str(gid), "-d", home, name])
    except KeyError:
        try:
            other = pwd.getpwuid(uid).pw_name
            _run(["usermod", "-l", name, "-g", str(gid), "-d", home, other])
        except KeyError:
            _run(["useradd", "-u", str(uid), "-g", str(gid), "-M", "-d", home, "-s", shell, name])
    home_path = paths.CONTAINER_HOME
    home_path.mkdir(parents=True, exist_ok=True)
    os.chown(home_path, uid, gid)
    for sub in (".copilot", ".cache", ".config"):
        path = home_path / sub
        if not path.exists():
            path.mkdir()
            os.chown(path, uid, gid)
    return name


# ----------------------------------------------------------------------------- services


def supervisor_rpc() -> xmlrpc.client.ServerProxy:
    from runtime.container.reloader import supervisor_rpc as rpc

    return rpc()


def process_info(name: str) -> dict[str, object] | None:
    try:
        return supervisor_rpc().supervisor.getProcessInfo(name)
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return None


def tail(path: Path, lines: int = 5) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def clean_run_dir() -> None:
    """Fresh state per container start: no stale marker can claim readiness, and the
    CA is new (a restarted interceptor keeps it, so the trusted CA stays valid)."""
    run = paths.run_dir()
    run.mkdir(parents=True, exist_ok=True)
    os.chmod(run, 0o755)
    uid, gid = logguard.proxy_ids()
    own = paths.interceptor_run_dir()
    own.mkdir(exist_ok=True)
    os.chown(own, uid, gid)
    os.chmod(own, 0o755)
    for stale in (paths.firewall_marker(), paths.interceptor_marker(), paths.ca_cert()):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    confdir = paths.confdir()
    if confdir.is_dir():
        for old in confdir.glob(f"{paths.CA_BASENAME}-*"):
            old.unlink()
    paths.component_log_dir().mkdir(parents=True, exist_ok=True)


def start_supervisord(env: dict[str, str]) -> subprocess.Popen[bytes]:
    conf = paths.supervisor_conf()
    if not conf.is_file():
        raise SetupFailed(
            f"{conf} is missing: the runtime is not installed (run secure-proxy-install)"
        )
    out = open(paths.component_log("supervisord-stdout"), "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    finally:
        out.close()


def wait_ready(sup: subprocess.Popen[bytes]) -> None:
    """Both markers, or a clear failure. Fail closed: nothing starts without the firewall."""
    start = time.monotonic()
    fw_log = paths.component_log("firewall")
    ic_log = paths.component_log("interceptor")
    firewall_ok = False
    while True:
        elapsed = time.monotonic() - start
        if sup.poll() is not None:
            raise SetupFailed(
                "supervisord exited during startup; see "
                f"{paths.component_log('supervisord')}\n"
                + "\n".join(tail(paths.component_log("supervisord-stdout")))
            )
        if not firewall_ok:
            if paths.firewall_marker().exists():
                firewall_ok = True
            else:
                info = process_info("firewall")
                if info and info.get("statename") in ("EXITED", "FATAL", "BACKOFF"):
                    if paths.firewall_marker().exists():
                        firewall_ok = True
                        continue
                    last = tail(fw_log, 1)
                    raise SetupFailed(
                        "The firewall could not lock the network: "
                        + (last[0] if last else f"exit status {info.get('exitstatus')}")
                        + f"\nThe command was not started (fail closed). Log: {fw_log}"
                    )
                if elapsed > FIREWALL_TIMEOUT:
                    raise SetupFailed(
                        f"The firewall did not report a verified lock within "
                        f"{FIREWALL_TIMEOUT:.0f} s; the command was not started. Log: {fw_log}"
                    )
        if firewall_ok and paths.interceptor_marker().exists():
            return
        if not paths.interceptor_marker().exists():
            info = process_info("interceptor")
            if info and info.get("statename") == "FATAL":
                raise SetupFailed(
                    "The interceptor failed to start (gave up after retries); the command "
                    f"was not started. Log: {ic_log}\n" + "\n".join(tail(ic_log))
                )
            if elapsed > INTERCEPTOR_TIMEOUT:
                raise SetupFailed(
                    f"The interceptor was not ready within {INTERCEPTOR_TIMEOUT:.0f} s; the "
                    f"command was not started. Log: {ic_log}\n" + "\n".join(tail(ic_log))
                )
        time.sleep(0.05)


def stop_supervisord(sup: subprocess.Popen[bytes] | None, reap: dict[int, int]) -> None:
    if sup is None or sup.pid in reap:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(sup.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        reap_zombies(reap)
        if sup.pid in reap:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sup.pid, signal.SIGKILL)
    reap_zombies(reap)


def reap_zombies(reaped: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reaped[pid] = status


# ----------------------------------------------------------------------------- leftovers


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) from /proc/<pid>/stat, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


def _uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of pid."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return {int(x) for x in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def whole_namespace() -> bool:
    """True when init is PID 1 of its PID namespace and /proc shows that namespace:
    then every other process in /proc is the container's. Otherwise (docker --init,
    a shared PID namespace) only init's own descendants are: init is their
    subreaper, so orphans of the command are re-parented to it, never elsewhere."""
    try:
        return os.getpid() == 1 and os.readlink("/proc/self") == "1"
    except OSError:
        return False


def leftovers(keep_root: int | None, app_uid: int | None) -> dict[int, str]:
    """pid -> start time of every live process that must end before the hand-over:
    all but init and the tree of keep_root (supervisord), plus any process in that
    tree running with the app user's uid (real, effective or saved)."""
    me = os.getpid()
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None:
                table[int(entry)] = info
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _start) in table.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root: int) -> set[int]:
        found, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    keep = tree(keep_root) if keep_root is not None else set()
    scope = set(table) if whole_namespace() else tree(me)
    out: dict[int, str] = {}
    for pid in scope - {me}:
        _ppid, state, start = table[pid]
        if state in ("Z", "X"):
            continue  # dead already; reaped by whoever waits for it (init, in the end)
        if pid not in keep or (app_uid is not None and app_uid in _uids(pid)):
            out[pid] = start
    return out


def _send(pid: int, start: str, sig: int) -> None:
    """Signal pid only if it is still the process we listed (a pidfd pins it)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        info = _proc_stat(pid)
        if info is not None and info[2] == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return
    try:
        info = _proc_stat(pid)
        if info is not None and info[2] == start:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def end_processes(
    keep_root: int | None, app_uid: int | None, reaped: dict[int, int], grace: float
) -> bool:
    """SIGTERM every leftover, SIGKILL what is still there after `grace`, until none
    remains (new ones included: a process forking while we scan is caught next round).
    Returns False if some were still alive after KILL_TIMEOUT (stuck in the kernel)."""
    start = time.monotonic()
    termed: set[tuple[int, str]] = set()
    while True:
        reap_zombies(reaped)
        left = leftovers(keep_root, app_uid)
        if not left:
            return True
        elapsed = time.monotonic() - start
        if elapsed > grace + KILL_TIMEOUT:
            trace(f"still running after SIGKILL: {sorted(left)}")
            return False
        for pid, started in left.items():
            if elapsed >= grace:
                _send(pid, started, signal.SIGKILL)
            elif (pid, started) not in termed:
                _send(pid, started, signal.SIGTERM)
                termed.add((pid, started))
        time.sleep(0.02)


def finish(
    sup: subprocess.Popen[bytes] | None,
    reaped: dict[int, int],
    app_uid: int | None,
    logs_prepared: bool,
) -> None:
    """The exit sequence: the command's leftovers, then supervisord, then the hand-over.

    The hand-over is the last step and happens only when no process but init is
    left: the log then belongs to the uid the command ran with, and nothing of
    the command may still be there to write to it.
    """
    for sig in FORWARDED:  # a signal now must not cut the sequence short
        signal.signal(sig, signal.SIG_IGN)
    clean = end_processes(sup.pid if sup else None, app_uid, reaped, KILL_GRACE)
    trace("command's processes gone" if clean else "command's processes NOT all gone")
    stop_supervisord(sup, reaped)
    trace("supervisord stopped")
    clean = end_processes(None, app_uid, reaped, 0.0) and clean
    if not logs_prepared:
        return
    if not clean:
        say(
            "[Network] Some processes could not be ended; the traffic log was not handed "
            f"over and still belongs to {paths.PROXY_USER}'s uid."
        )
        return
    try:
        done = logguard.hand_over()
    except (logguard.HandOverError, OSError) as exc:
        say(f"[Network] The traffic log was not handed over: {exc}")
        return
    trace(f"handed over: {', '.join(done)}")


# ----------------------------------------------------------------------------- CA


def make_ca() -> bytes:
    """This container start's CA, made in the interceptor's confdir before it starts.

    Clients' trust (update-ca-certificates: the slowest start-up step) can then
    run while the firewall and the interceptor come up, instead of after. The
    interceptor finds the CA there and publishes the same certificate.
    """
    from mitmproxy.certs import CertStore  # cryptography: imported only here

    confdir = paths.confdir()
    uid, gid = logguard.proxy_ids()
    confdir.mkdir(parents=True, exist_ok=True)
    os.chown(confdir, uid, gid)
    os.chmod(confdir, 0o700)
    old_umask = os.umask(0o077)
    try:
        CertStore.create_store(confdir, paths.CA_BASENAME, CA_KEY_SIZE)
    finally:
        os.umask(old_umask)
    for made in confdir.glob(f"{paths.CA_BASENAME}-*"):
        os.chown(made, uid, gid)
        os.chmod(made, 0o600 if made.name == paths.CA_KEY_NAME else 0o644)
    return (confdir / paths.CA_CERT_NAME).read_bytes()


def check_published_ca(pem: bytes) -> None:
    """The interceptor must serve the CA the clients were told to trust."""
    published = paths.ca_cert()
    if not published.is_file() or published.read_bytes().strip() != pem.strip():
        raise SetupFailed(
            f"the interceptor published a CA ({published}) other than the one trusted; "
            f"see {paths.component_log('interceptor')}"
        )


def trust_ca(uid: int, gid: int, pem: bytes) -> dict[str, str]:
    """The container's CA for every common client. Returns env vars for the command.

    NODE_EXTRA_CA_CERTS names the certificate the interceptor publishes once it
    is ready; the command starts only after that (and after check_published_ca).
    """
    ca = paths.ca_cert()
    bundle = paths.system_ca_bundle()
    trusted = False
    target = paths.system_ca_file()
    if shutil.which("update-ca-certificates"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pem)
        os.chmod(target, 0o644)
        result = subprocess.run(
            ["update-ca-certificates"], capture_output=True, text=True, check=False
        )
        trusted = result.returncode == 0 and pem.strip() in bundle.read_bytes()
    if not trusted:
        # No ca-certificates tooling: a bundle of our own, system roots + our CA.
        own = paths.run_dir() / "ca-bundle.pem"
        base = bundle.read_bytes() if bundle.is_file() else b""
        own.write_bytes(base.rstrip(b"\n") + b"\n" + pem)
        os.chmod(own, 0o644)
        bundle = own
    env = {
        "NODE_EXTRA_CA_CERTS": str(ca),
        "SSL_CERT_FILE": str(bundle),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "PIP_CERT": str(bundle),
        "CURL_CA_BUNDLE": str(bundle),
    }
    if (
        any(shutil.which(b) for b in BROWSERS)
        or Path("/ms-playwright").is_dir()
        or os.environ.get("PLAYWRIGHT_BROWSERS_PATH")
    ):
        trust_nss(ca, uid, gid)
    return env


def trust_nss(ca: Path, uid: int, gid: int) -> None:
    certutil = shutil.which("certutil")
    if not certutil:
        say(
            "[Network] A browser is installed but certutil (libnss3-tools) is not: browsers "
            "will not trust the proxy CA; install libnss3-tools in the image"
        )
        return
    db = paths.CONTAINER_HOME / ".pki" / "nssdb"
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    db.parent.mkdir(parents=True, exist_ok=True)
    os.chown(db.parent, uid, gid)
    if not db.exists():
        db.mkdir()
        os.chown(db, uid, gid)
        subprocess.run(
            [*as_user, certutil, "-d", f"sql:{db}", "-N", "--empty-password"],
            capture_output=True,
            check=False,
        )
    subprocess.run(
        [
            *as_user,
            certutil,
            "-d",
            f"sql:{db}",
            "-A",
            "-t",
            "C,,",
            "-n",
            "secure-proxy",
            "-i",
            str(ca),
        ],
        capture_output=True,
        check=False,
    )


# ----------------------------------------------------------------------------- command


def default_command() -> list[str]:
    if shutil.which("copilot"):
        return ["copilot"]
    return ["/bin/bash"] if Path("/bin/bash").exists() else ["/bin/sh"]


def user_env(name: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_PROXY_")}
    env.update(
        HOME=str(paths.CONTAINER_HOME),
        USER=name,
        LOGNAME=name,
        PWD=str(paths.container_project_dir()),
    )
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra)
    return env


def launch(command: list[str], uid: int, gid: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    tty = os.isatty(0)
    argv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--init-groups",
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--",
        *command,
    ]
    workdir = paths.container_project_dir()
    if not workdir.is_dir():
        workdir = paths.CONTAINER_HOME

    def preexec() -> None:
        # Own process group, and the terminal's foreground when there is one: Ctrl-C
        # and window resizes go to the command, not to init or supervisord.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.setpgid(0, 0)
        if tty:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(0, os.getpgrp())
        for sig in (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    try:
        return subprocess.Popen(argv, env=env, cwd=workdir, preexec_fn=preexec)
    except FileNotFoundError as exc:
        raise SetupFailed(f"cannot start the command: {exc}") from None


def reclaim_terminal() -> None:
    if not os.isatty(0):
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(0, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, old)


class CrashWatch(threading.Thread):
    """Tells the user once if the interceptor keeps crashing (traffic stays blocked)."""

    def __init__(self, sup_pid: int) -> None:
        super().__init__(name="crash-watch", daemon=True)
        self.sup_pid = sup_pid
        self.stop = threading.Event()

    def run(self) -> None:
        starts: list[float] = []
        last_pid = None
        told = False
        while not self.stop.wait(1.0) and not told:
            info = process_info("interceptor")
            if info is None:
                continue
            pid = info.get("pid") or None
            if pid and pid != last_pid:
                if last_pid is not None:
                    starts.append(time.monotonic())
                last_pid = pid
            recent = [t for t in starts if time.monotonic() - t < 60]
            if info.get("statename") in ("FATAL", "BACKOFF") or len(recent) >= 3:
                log = paths.component_log("interceptor")
                say(
                    f"\n[Network] The interceptor keeps crashing (see {log}); outbound web "
                    "traffic stays blocked until it recovers."
                )
                told = True


# ----------------------------------------------------------------------------- main


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    command = argv or default_command()
    if os.geteuid() != 0:
        say("secure-proxy-init must run as root (it is the container's entrypoint)")
        return EXIT_SETUP
    if os.getpid() != 1:
        # Not PID 1 (e.g. under another init): still reap our orphans.
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    child: subprocess.Popen[bytes] | None = None
    sup: subprocess.Popen[bytes] | None = None
    reaped: dict[int, int] = {}
    uid: int | None = None
    logs_prepared = False

    aborting = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal aborting
        if child is not None and child.pid not in reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)
        elif signum != signal.SIGWINCH and not aborting:
            # Before the command exists: abort startup once (a second signal while
            # services are being stopped must not cut the cleanup short).
            aborting = True
            raise Interrupted(signum)

    for sig in FORWARDED:
        signal.signal(sig, on_signal)

    try:
        try:
            resolved = compile_config()
        except ConfigError as exc:
            say(f"[Network] Invalid network config; the container does not start.\n{exc}")
            return EXIT_SETUP
        for line in describe(resolved, os.environ.get("SECURE_PROXY_HOST_LOG_DIR")):
            say(line)
        puid, pgid = host_ids()
        uid, gid = app_ids(puid, pgid, proxy_uid())
        clean_run_dir()
        ca_pem = make_ca()
        trace("CA made")
        write_policy(resolved.policy)
        session = {
            "config_kind": resolved.kind,
            "config_path": str(resolved.path) if resolved.path else None,
            "config_sha256": digest(resolved.path),
            "puid": puid,
            "pgid": pgid,
            "app_uid": uid,
            "app_gid": gid,
        }
        paths.session_file().write_text(json.dumps(session) + "\n")
        logs_prepared = True  # from here on /logs may be proxy-user's: hand it back at exit
        logguard.prepare()
        trace("policy + logs prepared")
        service_env = dict(os.environ)
        sup = start_supervisord(service_env)
        trace("supervisord started")
        name = ensure_appuser(uid, gid)
        trace("appuser ready")
        ca_env = trust_ca(uid, gid, ca_pem)  # while the firewall and interceptor start
        trace("CA trusted")
        wait_ready(sup)
        check_published_ca(ca_pem)
        trace("firewall + interceptor ready")
        child = launch(command, uid, gid, user_env(name, ca_env))
    except SetupFailed as exc:
        say(f"[Network] {exc}")
        finish(sup, reaped, uid, logs_prepared)
        return EXIT_SETUP
    except Interrupted as exc:
        finish(sup, reaped, uid, logs_prepared)
        return 128 + exc.signum

    watch = CrashWatch(sup.pid)
    watch.start()
    told_sup = False
    code = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except Interrupted:
            continue
        reaped[pid] = status
        if pid == child.pid:
            code = exit_code(status)
            break
        if pid == sup.pid and not told_sup:
            say(
                "\n[Network] supervisord exited; the firewall stays in place, so outbound "
                "web traffic is blocked."
            )
            told_sup = True
    watch.stop.set()
    reclaim_terminal()
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    trace(f"command exited ({code})")
    finish(sup, reaped, uid, logs_prepared)
    return code


if __name__ == "__main__":
    sys.exit(main())
