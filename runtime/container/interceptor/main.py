"""Start-up: the command line becomes mitmproxy options, then a master runs our addons
after the few of mitmproxy's that transparent mode needs (MITMPROXY_ADDONS).

Every option is declared once, by the addon that reads it (`load`) or by
mitmproxy itself; the command line (CLI below) only names which option a flag
sets, and takes the help text, type and choices from that declaration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from mitmproxy.exceptions import OptionsError
from mitmproxy.master import Master
from mitmproxy.options import Options

from runtime import paths
from runtime.container.interceptor import make_addons, pool
from runtime.container.interceptor.gate import STREAM_LARGE_BODIES
from runtime.container.interceptor.readiness import write_atomic

UPSTREAM_BUNDLE_NAME = "upstream-trust.pem"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

#: mitmproxy options that are the same on every run (not on the command line).
FIXED_OPTIONS: dict[str, Any] = {
    "listen_host": "",  # each mode names its own address
    "connection_strategy": "lazy",
    "stream_large_bodies": STREAM_LARGE_BODIES,
    "ssl_insecure": False,
    # Never relay what is not HTTP: with rawtcp on, mitmproxy passes unknown bytes
    # (and whatever follows a non-WebSocket 101) to the dialled address as raw TCP,
    # with no request hook called. No host is passed through or handled as TCP/UDP.
    # HttpOnly refuses such layers too.
    "rawtcp": False,
    "tcp_hosts": [],
    "udp_hosts": [],
    "ignore_hosts": [],
    "allow_hosts": [],
    "websocket": True,
}


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    `option`: the mitmproxy option it sets (help, type and choices come from the
    option's declaration); None for an input the options are derived from.
    `env`: an environment variable that replaces the default. `default`: ours,
    where it differs from the option's own.
    """

    flag: str
    option: str | None
    env: str | None = None
    default: Callable[[], Any] | None = None
    help: str = ""

    @property
    def dest(self) -> str:
        return self.option or self.flag.lstrip("-").replace("-", "_")


CLI: tuple[Flag, ...] = (
    Flag(
        "--listen-host",
        None,
        "SECURE_PROXY_LISTEN_HOST",
        lambda: "loopback",
        "address to listen on (default: loopback, i.e. 127.0.0.1 and ::1)",
    ),
    Flag("--port", "listen_port", default=lambda: paths.INTERCEPTOR_PORT),
    Flag(
        "--workers",
        None,
        help="import once, then fork N worker processes (0 .. N-1) and keep them running "
        "(pool.py); without it this process is the one worker --worker names",
    ),
    Flag(
        "--worker",
        None,
        "SECURE_PROXY_WORKER",
        lambda: 0,
        "this process is worker N of several: it listens on --port + N and writes its "
        "own readiness marker (default: 0)",
    ),
    # supervisord sets no HOME, so never ~/.mitmproxy.
    Flag("--confdir", "confdir", default=lambda: str(paths.confdir())),
    Flag("--policy", "secure_proxy_policy", default=lambda: str(paths.policy_file())),
    Flag("--traffic-log", "secure_proxy_traffic_log"),
    Flag("--credentials", "secure_proxy_credentials"),
    Flag("--ca-cert", "secure_proxy_ca_cert"),
    Flag("--ready-marker", "secure_proxy_ready_marker"),
    Flag(
        "--upstream-ca",
        None,
        "SECURE_PROXY_UPSTREAM_CA",
        help="extra CA bundle trusted for upstream servers, besides the system store",
    ),
    Flag("--verbosity", "termlog_verbosity", "SECURE_PROXY_MITM_VERBOSITY", lambda: "warn"),
)


def parse_args(options: Options, argv: list[str] | None) -> argparse.Namespace:
    """The command line, against the options our addons and mitmproxy declared."""
    ap = argparse.ArgumentParser(
        prog="secure-proxy-interceptor",
        description="mitmproxy in transparent mode, enforcing /run/secure-proxy/policy.json.",
    )
    for flag in CLI:
        help_text, choices, default = flag.help, None, None
        if flag.option is not None:
            # mitmproxy's own make_parser reads the declaration the same way.
            declared = options._options[flag.option]
            help_text = " ".join(declared.help.split())
            choices, default = declared.choices, declared.default
        if flag.default is not None:
            default = flag.default()
        if flag.env and os.environ.get(flag.env):
            default = os.environ[flag.env]
        kind = int if isinstance(default, int) else str
        ap.add_argument(
            flag.flag,
            dest=flag.dest,
            type=kind,
            default=None if default is None else kind(default),
            choices=choices,
            help=help_text,
        )
    return ap.parse_args(argv)


def prepare_confdir(confdir: Path) -> None:
    """The confdir holds the CA key the init made there: private to us."""
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):
        os.chmod(confdir, 0o700)


def build_upstream_bundle(
    confdir: Path, extra: str | None, system: Path = SYSTEM_CA_BUNDLE
) -> Path | None:
    """System trust store + the optional extra CA bundle, as one file for mitmproxy.

    mitmproxy verifies upstream against certifi unless told otherwise; corporate
    CAs live in the system store. None: no system store and no extra (certifi stays).
    """
    parts: list[bytes] = []
    if system.is_file():
        parts.append(system.read_bytes())
    if extra:
        extra_path = Path(extra)
        if not extra_path.is_file():
            raise FileNotFoundError(f"upstream CA bundle {extra_path} does not exist")
        parts.append(extra_path.read_bytes())
    if not parts:
        return None
    if not system.is_file():
        import certifi  # a mitmproxy dependency

        parts.insert(0, Path(certifi.where()).read_bytes())
    target = confdir / UPSTREAM_BUNDLE_NAME
    data = b"".join(p.rstrip(b"\n") + b"\n" for p in parts)
    write_atomic(target, data, 0o644)
    return target


def _can_bind(family: socket.AddressFamily, host: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def transparent_modes(listen_host: str, port: int) -> list[str]:
    """Where to listen. By default loopback only, IPv4 and IPv6: the REDIRECT of
    locally generated traffic lands on 127.0.0.1 / ::1, and nothing outside the
    box must be able to use us as an open proxy. ::1 is skipped where IPv6 is
    disabled (Docker's default), since there is then no IPv6 traffic to catch."""
    if listen_host not in ("", "loopback"):
        return [f"transparent@{listen_host}:{port}"]
    modes = [f"transparent@127.0.0.1:{port}"]
    if _can_bind(socket.AF_INET6, "::1"):
        modes.append(f"transparent@::1:{port}")
    return modes


def mitmproxy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options for one run: the flags' options, the fixed ones and what derives from
    the listen address, the worker number and the upstream CA. Prepares the confdir
    (raises OSError; ValueError for a worker whose port is out of range)."""
    opts = {flag.option: getattr(args, flag.dest) for flag in CLI if flag.option is not None}
    confdir = Path(opts["confdir"])
    prepare_confdir(confdir)
    bundle = build_upstream_bundle(confdir, args.upstream_ca)
    opts.update(FIXED_OPTIONS)
    worker = args.worker
    if worker:
        if worker < 0 or opts["listen_port"] + worker > 65535:
            raise ValueError(
                f"--worker {worker}: port {opts['listen_port'] + worker} is out of range"
            )
        opts["listen_port"] += worker
        # Each worker its own marker, unless one was named: the init waits for all N.
        if opts["secure_proxy_ready_marker"] == str(paths.interceptor_marker()):
            opts["secure_proxy_ready_marker"] = str(paths.interceptor_marker(worker))
    opts["mode"] = transparent_modes(args.listen_host, opts["listen_port"])
    if bundle is not None:
        opts["ssl_verify_upstream_trusted_ca"] = str(bundle)
    return opts


#: mitmproxy's addons that transparent mode runs, in DumpMaster's order (module, class).
#: Left out of DumpMaster's set: the onboarding app, proxy authentication, the dumper
#: (flow_detail 0 printed nothing), Block (block_global: clients reach us only through
#: the box's REDIRECT, from any source address), DNS, scripts, replay, map/modify,
#: save, export/cut, sticky auth/cookies, upstream auth, alt-svc (reverse mode),
#: browser, comment, command history, anticache/anticomp, read-file, keep-serving.
#: Their options are then undeclared: setting one is an error, not a silent no-op.
MITMPROXY_ADDONS: tuple[tuple[str, str], ...] = (
    ("core", "Core"),  # option checks, the `set` command
    ("disable_h2c", "DisableH2C"),  # h2c upgrade headers go, HTTP/2 prior knowledge is killed
    ("proxyserver", "Proxyserver"),  # listens, runs the connection handlers
    ("next_layer", "NextLayer"),  # TLS / HTTP layer choice (HttpOnly judges it after)
    ("tlsconfig", "TlsConfig"),  # the CA, certificates, upstream verification
    ("errorcheck", "ErrorCheck"),  # an error while starting (port taken) exits 1
)


def _ca_loaded_once(tls_config: type) -> type:
    """mitmproxy's TlsConfig, but `running` does not load the CA again when the options
    already did (mitmproxy reloads it there as a workaround for its console; loading
    takes a few ms with the P-256 key ca.py makes, 50-150 ms with an RSA one). A later change of
    confdir or certs still reloads it (configure)."""

    class TlsConfigCALoadedOnce(tls_config):  # type: ignore[misc,valid-type]
        name = "tlsconfig"  # the addon's name, as mitmproxy's own

        def running(self) -> None:
            if getattr(self, "certstore", None) is None:
                super().running()

    return TlsConfigCALoadedOnce


def make_master() -> Master:
    """mitmproxy's master with MITMPROXY_ADDONS (termlog first), then ours: every option
    is declared once this returns. Needs a running event loop."""
    master = Master(Options(), with_termlog=True)
    for module, name in MITMPROXY_ADDONS:
        cls = getattr(importlib.import_module(f"mitmproxy.addons.{module}"), name)
        master.addons.add((_ca_loaded_once(cls) if name == "TlsConfig" else cls)())
    master.addons.add(*make_addons())
    return master


async def serve(master: Master, options: dict[str, Any]) -> int:
    """Apply the options (the policy loads here, or nothing starts) and run until signalled."""
    try:
        master.options.update(**options)
    except OptionsError as exc:
        logger.error("{}", exc)
        return 2
    logger.info(
        "interceptor starting: policy {}, confdir {}, modes {}",
        master.options.secure_proxy_policy,
        master.options.confdir,
        master.options.mode,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()
    return 0


async def _run(argv: list[str] | None) -> int:
    master = make_master()
    args = parse_args(master.options, argv)
    try:
        options = mitmproxy_options(args)
    except ValueError as exc:
        logger.error("not starting: {}", exc)
        return 2
    except OSError as exc:
        logger.error("not starting: {} (confdir {}, --upstream-ca)", exc, args.confdir)
        return 2
    return await serve(master, options)


def _log_to_stderr(worker: int | None = None) -> None:
    """loguru's format; a worker of the pool (they share one log) names itself."""
    who = "" if worker is None else f"worker {worker} | "
    logger.remove()
    logger.add(
        sys.stderr,
        level=os.environ.get("SECURE_PROXY_LOG_LEVEL", "INFO"),
        format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
        + who
        + "<cyan>{name}</cyan>:<cyan>{function}</cyan>:<cyan>{line}</cyan> - "
        "<level>{message}</level>",
    )


def main(argv: list[str] | None = None) -> int:
    """The console script `secure-proxy-interceptor`: one worker, or with --workers N
    the pool that forks N of them."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--workers", type=int)
    pre.add_argument("--worker")
    known, rest = pre.parse_known_args(argv)
    _log_to_stderr()
    if known.workers is None:
        # One worker alone takes SIGHUP as usual (launch.py blocked it for the pool).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGHUP])
        return asyncio.run(_run(argv))
    if known.worker is not None or known.workers < 1:
        logger.error("not starting: --workers takes a number of at least 1, without --worker")
        return 2

    def serve(worker: int) -> int:
        _log_to_stderr(worker)
        return asyncio.run(_run([*rest, "--worker", str(worker)]))

    return pool.run(known.workers, serve)
