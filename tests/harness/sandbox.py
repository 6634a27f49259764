"""Drive `copilot_here --engine sandbox` from tests, and reach into a running sandbox.

    internet = Internet.start(topo, workdir)          # test CA + HTTPS server on the net host
    r = run_cli(project, ["--", "curl", ...], netns=topo.net, add_hosts=internet.add_hosts())
    with Session(project, [...], netns=...) as s:     # a sandbox running in the background
        s.root(["supervisorctl", "status"])           # as root inside the sandbox
        s.lines()                                     # the command's stdout, line by line

The CLI runs from the checkout (root can read it); inside the sandbox the runtime
is laid by runtime.install, as in the image.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .netns import Topology
from .source import python_bin
from .upstream import UpstreamCA, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = (
    "api.github.com",
    "github.com",
    "gist.github.com",
    "api.githubcopilot.com",  # the Copilot CLI's second stop (tests/e2e/test_signin.py)
    "example.com",
    "evil.test",
    "npm.registry.test",
    "v6.test",
)


# The CLI's host state (traffic logs) for tests that do not give their own
def cli_argv(
    args: Sequence[str],
    netns: str | None = None,
    add_hosts: Mapping[str, str] | None = None,
) -> list[str]:
    argv = [python_bin(), "-m", "runtime.host.cli", "--engine", "sandbox"]
    if netns:
        argv += ["--sandbox-netns", netns]
    for name, ip in (add_hosts or {}).items():
        argv += ["--add-host", f"{name}:{ip}"]
    return argv + list(args)


@functools.cache
def state_home() -> str:
    """The CLI's XDG_STATE_HOME in tests (approvals, the empty mount): never the machine's."""
    path = os.environ.get("SP_TEST_STATE") or tempfile.mkdtemp(prefix="sp-state-", dir="/tmp")
    if not os.environ.get("SP_TEST_STATE"):
        atexit.register(shutil.rmtree, path, True)
    return path


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": os.environ.get("SP_TEST_HOME", "/nonexistent-home"),
        "XDG_STATE_HOME": state_home(),
        # The Copilot CLI's state directory (runtime.host.copilotstate) goes here too.
        "XDG_CONFIG_HOME": os.path.join(state_home(), "config"),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def host_logs(project: Path, env: Mapping[str, str] | None = None) -> Path:
    """The CLI's default host logs directory for `project` under cli_env(env)."""
    from runtime.host.hoststate import path_key, state_root

    full = cli_env(env)
    return state_root(Path(full["HOME"]), full) / "logs" / path_key(project.resolve())


class Internet:
    """The test internet on the Topology's net host: one HTTPS/HTTP server for all names.

    `names`: the names its certificate is for; `hosts`: the names the sandbox's
    /etc/hosts lists (add_hosts; default `names`; others resolve through DNS).
    `record`: the server's own per-request record (upstream.py). `alt_certs`: SNI
    name -> (cert, key) shown instead, e.g. one signed by a CA nobody trusts."""

    def __init__(
        self,
        topo: Topology,
        ca: Any,
        proc: subprocess.Popen[Any],
        hosts: Sequence[str] = NAMES,
        record: Path | None = None,
    ) -> None:
        self.topo = topo
        self.ca = ca
        self.proc = proc
        self.hosts = tuple(hosts)
        self.record = record

    @classmethod
    def start(
        cls,
        topo: Topology,
        workdir: Path,
        source_path: str,
        *,
        git_root: Path | None = None,
        record: Path | None = None,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] = NAMES,
        hosts: Sequence[str] | None = None,
        alt_certs: Mapping[str, tuple[Path, Path]] | None = None,
    ) -> Internet:
        """With `git_root`, git smart HTTP for its repositories (tests.harness.gitserver);
        with `record`, the server's account of every request it received; `env`: more
        of its environment (the real token of /copilot_internal/user). `names`, `hosts`
        and `alt_certs`: see the class."""
        ca = UpstreamCA.create(workdir / "ca", names=list(names))
        module = "tests.harness.gitserver" if git_root else "tests.harness.upstream"
        argv = [python_bin(), "-m", module, "serve"]
        argv += ["--cert", str(ca.server_cert), "--key", str(ca.server_key)]
        if git_root:
            argv += ["--git-root", str(git_root)]
        if record:
            argv += ["--record", str(record)]
        if alt_certs and git_root:
            raise ValueError("alt_certs: the git server takes none (tests.harness.upstream does)")
        for name, (cert, key) in (alt_certs or {}).items():
            argv += ["--alt-cert", f"{name}={cert}:{key}"]
        proc = topo.net_popen(argv, env={"PYTHONPATH": source_path, **(env or {})}, text=True)
        wait_ready(proc)
        return cls(topo, ca, proc, names if hosts is None else hosts, record)

    def add_hosts(self) -> dict[str, str]:
        hosts = {name: self.topo.net_ip for name in self.hosts if name != "v6.test"}
        if "v6.test" in self.hosts:
            hosts["v6.test"] = self.topo.net_ip6
        return hosts

    def env(self) -> dict[str, str]:
        return {"SECURE_PROXY_UPSTREAM_CA": str(self.ca.ca_cert)}


def run_cli(
    project: Path,
    args: Sequence[str],
    internet: Internet | None = None,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = cli_argv(
        args,
        internet.topo.net if internet else None,
        internet.add_hosts() if internet else None,
    )
    full_env = cli_env({**(internet.env() if internet else {}), **(env or {})})
    return subprocess.run(
        argv,
        cwd=project,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


class Session:
    """A sandbox running in the background; its stdout is read line by line."""

    def __init__(
        self,
        project: Path,
        args: Sequence[str],
        internet: Internet | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = cli_argv(
            args,
            internet.topo.net if internet else None,
            internet.add_hosts() if internet else None,
        )
        self.env = cli_env({**(internet.env() if internet else {}), **(env or {})})
        self.project = project
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = ""

    def __enter__(self) -> Session:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.project,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        def pump_err() -> None:
            assert self.proc and self.proc.stderr
            for line in self.proc.stderr:
                self.stderr += line

        threading.Thread(target=pump, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def next_line(self, timeout: float = 30) -> str | None:
        return self._lines.get(timeout=timeout)

    def wait_for(self, predicate: Any, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching line; stderr:\n{self.stderr}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"sandbox ended; stderr:\n{self.stderr}")
            if predicate(line):
                return line

    def wait(self, timeout: float = 30) -> int:
        assert self.proc
        return self.proc.wait(timeout=timeout)

    def init_pid(self) -> int:
        """Host pid of the sandbox's PID 1 (python CLI -> unshare -> init)."""
        assert self.proc
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for unshare in _children(self.proc.pid):
                kids = _children(unshare)
                if kids:
                    return kids[0]
            time.sleep(0.05)
        raise TimeoutError("sandbox PID 1 not found")

    def root(self, argv: Sequence[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run argv as root inside the sandbox (all its namespaces)."""
        pid = self.init_pid()
        full = ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "--", *argv]
        return subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )

    def worker_pid(self, n: int) -> int:
        """Interceptor worker n's pid (the pool names it interceptor-n), 0 when there is
        none."""
        out = self.root(["pgrep", "-x", f"interceptor-{n}"]).stdout.split()
        return int(out[0]) if len(out) == 1 else 0

    def program_states(self) -> dict[str, str]:
        """supervisorctl status as program -> state; a group is RUNNING when all its
        processes are."""
        out = self.root(["supervisorctl", "status"]).stdout
        states: dict[str, str] = {}
        for ln in out.splitlines():
            if len(ln.split()) > 1:
                name, state = ln.split()[0].split(":", 1)[0], ln.split()[1]
                if states.get(name, "RUNNING") == "RUNNING":
                    states[name] = state
        return states


def client_script(code: str) -> list[str]:
    """argv running a Python snippet with the sandbox's (reused) interpreter."""
    return [python_bin(), "-c", code]


REQUEST_LOOP = r"""
import json, ssl, sys, time, urllib.request, urllib.error
urls = sys.argv[1].split(",")
period = float(sys.argv[2]); total = float(sys.argv[3])
ctx = ssl.create_default_context()
for extra in sys.argv[4:]:
    ctx.load_verify_locations(extra)
end = time.monotonic() + total
print("LOOP-START", flush=True)
while time.monotonic() < end:
    for url in urls:
        t = time.time()
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                out = {"url": url, "status": r.status}
        except urllib.error.HTTPError as e:
            out = {"url": url, "status": e.code}
        except Exception as e:
            out = {"url": url, "status": 0, "error": type(e).__name__ + ": " + str(e)[:80]}
        out["t"] = t
        print(json.dumps(out), flush=True)
    time.sleep(period)
"""


def request_loop(
    urls: Sequence[str], period: float = 0.1, total: float = 20, extra_ca: str | None = None
) -> list[str]:
    """argv printing one JSON line per request. extra_ca: a CA file trusted besides the
    default store (e.g. /ca/upstream-ca.pem, for requests that meet no interceptor)."""
    argv = [python_bin(), "-c", REQUEST_LOOP, ",".join(urls), str(period), str(total)]
    return argv + ([extra_ca] if extra_ca else [])


def sandbox_nameservers() -> list[str]:
    """The resolvers a sandbox asks: its resolv.conf is the host's (the sandbox's root
    is an overlay of /). Loopback ones are unreachable from its network namespace."""
    from firewall.ruleset import parse_resolv_conf, split_nameservers

    v4, v6 = split_nameservers(parse_resolv_conf(Path("/etc/resolv.conf").read_text()))
    return v4 + v6


class Resolver:
    """The test DNS server on the net host, at the addresses the sandbox's resolv.conf
    names: every query that leaves a sandbox lands here (inside the test namespaces,
    never at the machine's resolver), one record per query in `seen`."""

    def __init__(self, proc: subprocess.Popen[str], addresses: list[str]) -> None:
        self.proc = proc
        self.addresses = addresses
        self.seen: queue.Queue[dict[str, Any]] = queue.Queue()

        def pump() -> None:
            assert proc.stdout
            for line in proc.stdout:
                self.seen.put(json.loads(line))

        threading.Thread(target=pump, daemon=True).start()

    @classmethod
    def start(cls, topo: Topology, records: Mapping[str, Any], source_path: str) -> Resolver:
        addresses = sandbox_nameservers()
        if not addresses:
            raise RuntimeError(
                "/etc/resolv.conf names no resolver outside loopback: a sandbox's DNS "
                "cannot be observed on the net host; add a nameserver line"
            )
        for address in addresses:
            topo.add_address(address)
        args = [arg for a in addresses for arg in ("--bind", a)]
        args += ["--records", json.dumps(records)]
        proc = topo.net_popen(
            [python_bin(), "-m", "tests.harness.dns", "serve", *args],
            env={"PYTHONPATH": source_path},
            text=True,
        )
        assert proc.stdout and proc.stdout.readline().strip() == "READY"
        return cls(proc, addresses)

    def names(self, wait: float = 0.5) -> list[str]:
        """Names asked since the last call (after `wait` seconds for stragglers)."""
        time.sleep(wait)
        out = []
        while not self.seen.empty():
            out.append(self.seen.get()["name"])
        return out


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def step(tag: str, command: str) -> str:
    """One probe in its own subshell: `TAG ok` or `TAG failed <its output>`."""
    return (
        f"( {command} ) >/tmp/{tag}.out 2>&1 && echo '{tag} ok' "
        f"|| echo \"{tag} failed $(tr '\\n' ' ' < /tmp/{tag}.out)\""
    )


def quote(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def write_config(
    project: Path, data: dict[str, Any], approve: bool = True, state: str | None = None
) -> Path:
    """Write a network.json (repo config, or global when `project` is a HOME) and,
    as the user's own file, approve it in the CLI's state (XDG_STATE_HOME `state`,
    default the tests' one): a run refuses an unapproved repo config."""
    from runtime.host import hoststate, trust

    path = project / ".copilot_here" / "network.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    path.write_text(text)
    if approve:
        root = hoststate.state_root(Path("/"), {"XDG_STATE_HOME": state or state_home()})
        trust.approve(root, path, text.encode())
    return path


def enforce(*hosts: str) -> dict[str, Any]:
    return {
        "enabled": True,
        "inherit_defaults": False,
        "mode": "enforce",
        "log_to_file": True,
        "allowed_rules": [{"host": h} for h in hosts],
    }


__all__ = [
    "Internet",
    "Resolver",
    "Session",
    "client_script",
    "enforce",
    "host_logs",
    "quote",
    "request_loop",
    "run_cli",
    "sh",
    "write_config",
]

if __name__ == "__main__":  # pragma: no cover
    print("tests.harness.sandbox is a library", file=sys.stderr)
    sys.exit(2)
