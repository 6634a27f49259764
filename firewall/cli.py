"""secure-proxy-firewall: apply, verify, show and remove the network lock.

    secure-proxy-firewall apply  [--proxy-user NAME|UID] [--port N] [--resolv-conf PATH]
                                 [--dns-guard-port N] [--policy PATH] [--workers N]
    secure-proxy-firewall verify [same options]
    secure-proxy-firewall status [same options]
    secure-proxy-firewall remove [same options]

--policy: the level follows the compiled policy (ruleset.lock_level): rules enabled
lock the network (with the DNS guard when --dns-guard-port is given); rules disabled
with a log redirect TCP 80/443 only; rules disabled without a log remove our chains.
Without --policy: the full lock. --workers N: the interceptor runs as N processes on
--port .. --port+N-1, and new connections are spread over them in turn.

apply: install the rules (IPv4 + IPv6), read them back, compare with the intent;
only if identical write the marker runtime.paths.firewall_marker() (none at level
none). Any failure: remove a stale marker, print one line of cause and fix, exit 1.
verify: exit 0 if the rules in the kernel are exactly the intended ones, else 1
(and remove a stale marker). status: print our rules in iptables-save form and
whether they are intact; exit 0 intact, 1 not. remove: delete exactly our chains
and the jumps to them, give the built-in chains the policies they had before our
first apply (ACCEPT when none was recorded), remove the marker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from runtime import fsutil, paths
from runtime.policyfile import read_policy

from . import ipset, iptables
from .iptables import FirewallError, HookPolicies
from .ruleset import LockLevel, Ruleset, build_ruleset, lock_level, parse_resolv_conf

PROG = "secure-proxy-firewall"


def saved_policies_file() -> Path:
    """The built-in chains' policies before our first apply, to give back on removal."""
    return paths.run_dir() / "firewall.policies.json"


def resolve_uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise FirewallError(
            f"unknown proxy-user '{user}': create it (useradd --system {user}) "
            "or pass --proxy-user with a numeric uid"
        ) from None


def read_nameservers(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        logger.warning("{} not found: DNS allowed to loopback resolvers only", path)
        return []
    except OSError as exc:
        raise FirewallError(f"cannot read {path} ({exc.strerror}): pass --resolv-conf") from exc
    return parse_resolv_conf(text)


def level_from_args(args: argparse.Namespace) -> LockLevel:
    if args.cmd == "remove":
        return LockLevel.NONE
    if args.policy is None:
        return LockLevel.FULL
    try:
        return lock_level(read_policy(Path(args.policy)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FirewallError(
            f"cannot read the policy {args.policy} ({exc}): the init writes it before "
            "starting the firewall; pass --policy with a compiled policy.json"
        ) from exc


#: The interceptor's processes for this run, as the init resolved them (runtime.container
#: .services.WORKERS_ENV; also in the session file, for a verify run from a shell).
WORKERS_ENV = "SECURE_PROXY_INTERCEPTOR_WORKERS"


def default_workers() -> int:
    """--workers when not given: the run's (environment, else the session file), else 1."""
    try:
        if os.environ.get(WORKERS_ENV):
            return int(os.environ[WORKERS_ENV])
        return int(json.loads(paths.session_file().read_text()).get("workers", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def build_from_args(args: argparse.Namespace) -> Ruleset:
    uid = resolve_uid(str(args.proxy_user))
    level = level_from_args(args)
    workers = default_workers() if args.workers is None else args.workers
    try:
        return build_ruleset(
            uid,
            args.port,
            read_nameservers(Path(args.resolv_conf)),
            args.dns_guard_port,
            level,
            workers,
        )
    except ValueError as exc:
        raise FirewallError(f"{exc}: pass another --proxy-user / --port / --workers") from exc


def hook_policies(ruleset: Ruleset) -> HookPolicies:
    """What the built-in chains get back when our chains leave: recorded once, before
    our first apply changes them, and kept until our chains are all gone."""
    saved = saved_policies_file()
    try:
        data = json.loads(saved.read_text())
        return {(int(k.split(":")[0]), k.split(":")[1]): str(v) for k, v in data.items()}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, IndexError) as exc:
        logger.warning("ignoring {} ({}): policies are given back as ACCEPT", saved, exc)
        return {}
    current = iptables.read_policies(ruleset)
    if current is None:  # our chains are there already: their policy is ours
        return {}
    if ruleset.level is not LockLevel.NONE:
        data = {f"{fam}:{hook}": policy for (fam, hook), policy in current.items()}
        fsutil.atomic_write(saved, json.dumps(data) + "\n", 0o644)
    return current


def remove_marker() -> None:
    """Fail closed: no marker while the rules are not known to be intact."""
    with contextlib.suppress(FileNotFoundError):
        paths.firewall_marker().unlink()


def write_marker(ruleset: Ruleset) -> Path:
    run = paths.run_dir()
    run.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(run, 0o755)
    marker = paths.firewall_marker()
    payload = {
        "verified_at": time.time(),
        "level": ruleset.level.value,
        "proxy_uid": ruleset.proxy_uid,
        "port": ruleset.port,
        "workers": ruleset.workers,
        "dns_guard_port": ruleset.dns_port,
        "nameservers": list(ruleset.nameservers),
    }
    return fsutil.atomic_write(marker, json.dumps(payload) + "\n", 0o644)


def cmd_apply(args: argparse.Namespace) -> int:
    # Everything that can fail without touching the kernel comes first.
    ruleset = build_from_args(args)
    iptables.check_capabilities()
    remove_marker()
    problems = iptables.apply(ruleset, hook_policies(ruleset))
    if ruleset.level is LockLevel.FULL and args.policy is not None:
        open_literal_ports(Path(args.policy))
    if problems:
        raise FirewallError(
            f"rules read back differ from the intended set ({problems[0]}; "
            f"{len(problems)} difference(s)): another tool is changing iptables, stop it"
        )
    if ruleset.level is LockLevel.NONE:
        saved_policies_file().unlink(missing_ok=True)
        logger.info("no rule of ours is left: the network is untouched")
        return 0
    marker = write_marker(ruleset)
    logger.info(
        "firewall applied and verified (level {}, proxy uid {}, port {} x{}, DNS guard {}, "
        "nameservers {}); marker {}",
        ruleset.level.value,
        ruleset.proxy_uid,
        ruleset.port,
        ruleset.workers,
        ruleset.dns_port or "none",
        ", ".join(ruleset.nameservers) or "none",
        marker,
    )
    return 0


def open_literal_ports(policy_file: Path) -> None:
    """A rule whose host is an IP literal opens its `ports` for the run: entries without
    a timeout (the port keeper adds the named hosts' as the DNS guard answers)."""
    try:
        entries = ipset.literal_entries(read_policy(policy_file))
        ipset.add(e for e in entries if e.family == 4 or iptables.ipv6_available())
    except ipset.IpsetError as exc:
        raise FirewallError(str(exc)) from exc
    if entries:
        logger.info("ports opened for the run: {}", ", ".join(e.line() for e in entries))


def cmd_verify(args: argparse.Namespace) -> int:
    ruleset = build_from_args(args)
    problems = iptables.verify(ruleset)
    if problems:
        for p in problems:
            logger.debug(p)
        raise FirewallError(
            f"firewall not intact ({problems[0]}; {len(problems)} difference(s)): "
            f"run `{PROG} apply`"
        )
    logger.info("firewall intact")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    ruleset = build_from_args(args)
    iptables.check_capabilities()
    states = iptables.read_states(ruleset)
    sys.stdout.write(f"# level {ruleset.level.value}\n")
    sys.stdout.write(iptables.status_text(states))
    problems = [p for spec, state in states for p in iptables.diff_table(spec, state)]
    problems += iptables.leftover_problems(ruleset)
    if problems:
        print("# NOT intact:")
        for p in problems:
            print(f"#   {p}")
        return 1
    print("# intact")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("apply", "install, read back and verify the rules; then write the marker"),
        ("verify", "exit 0 if the rules are intact, 1 otherwise"),
        ("status", "print our rules (iptables-save form) and whether they are intact"),
        ("remove", "delete our chains and jumps, give the built-in chains their policies back"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--proxy-user", default=paths.PROXY_USER, help="name or numeric uid")
        p.add_argument("--port", type=int, default=paths.INTERCEPTOR_PORT)
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            help="interceptor processes on --port .. --port+N-1; new connections are spread "
            f"over them (default: ${WORKERS_ENV}, else the run's session file, else 1)",
        )
        p.add_argument("--resolv-conf", default="/etc/resolv.conf")
        p.add_argument(
            "--dns-guard-port",
            type=int,
            default=None,
            help="send every user's DNS to the DNS guard on this loopback port; only "
            "proxy-user reaches the resolvers (default: no guard)",
        )
        p.add_argument(
            "--policy",
            default=None,
            help="compiled policy.json: the level follows it (default: the full lock)",
        )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logger.remove()
    level = "DEBUG" if args.verbose or os.environ.get("SECURE_PROXY_DEBUG") else "INFO"
    logger.add(sys.stderr, level=level, format=f"{PROG}: {{level}}: {{message}}")
    handler = {"apply": cmd_apply, "verify": cmd_verify, "status": cmd_status, "remove": cmd_apply}[
        args.cmd
    ]
    try:
        return handler(args)
    except FirewallError as exc:
        if args.cmd != "status":
            try:
                remove_marker()
            except OSError as rm_exc:
                logger.error(f"{exc}; also cannot remove stale marker: {rm_exc}")
                return 1
        logger.error(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
