"""Finding, reading and compiling the config: the I/O around the pure core.

Resolution: the repo config wins outright; else the
global config; else copilot_here's own global Airlock config
(~/.config/copilot_here/network.json, read as Airlock's format: runtime.core.airlock);
else the built-in defaults (allow-all). No merging between them. The init, the
reloader and the host CLI all resolve through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import paths
from runtime.core.compile import built_in_rules, compile_policy, unfilled_entries
from runtime.core.config import ConfigError, NetworkConfig, Problem, RuleSpec, parse_config
from runtime.core.github import repository_of, repository_values
from runtime.core.hosts import HostError, normalize_host_pattern
from runtime.core.policy import Mode, Policy, Rule

BUILT_IN_SOURCE = "built-in defaults"
REPO, GLOBAL, BUILT_IN = "repo", "global", "built-in"
#: copilot_here's global Airlock config: used when neither of ours exists.
AIRLOCK_GLOBAL = "airlock-global"
AIRLOCK_GLOBAL_RELATIVE = Path(".config") / "copilot_here" / "network.json"

#: OWNER/REPO of the project's GitHub repository, for {{GITHUB_OWNER}}/{{GITHUB_REPO}}:
#: set by the host CLI (from the project's approved origin remote), read by the init
#: and the reloader. Unset or unusable: the rules that name it drop out.
GITHUB_REPO_ENV = "SECURE_PROXY_GITHUB_REPO"
#: The methods of the package-registry rules: installs read, nothing is published.
REGISTRY_METHODS = ["GET", "HEAD"]


def values_from_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The placeholder values the host passed in (GITHUB_REPO_ENV); {} without them."""
    environ = os.environ if environ is None else environ
    return repository_values(environ.get(GITHUB_REPO_ENV))


@dataclass(frozen=True)
class Resolved:
    kind: str  # REPO, GLOBAL or BUILT_IN
    path: Path | None
    config: NetworkConfig
    policy: Policy
    #: package_registries of defaults.json whose hosts were not recorded here (a host
    #: install): the built-in rules then lack them, and the CLI says so.
    unlisted_registries: tuple[str, ...] = ()
    #: The placeholder values the rules were filled with ({} without a repository).
    values: Mapping[str, str] = field(default_factory=dict)
    #: `host/path` of the rule entries in force that name a placeholder ...
    templated: tuple[str, ...] = ()
    #: ... and of those among them left out for want of a value (never widened).
    unfilled: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return str(self.path) if self.path else BUILT_IN_SOURCE

    # One description of the effective config, for the init's banner and --network-show.

    @property
    def kind_label(self) -> str:
        return {
            REPO: "repo config",
            GLOBAL: "global config",
            AIRLOCK_GLOBAL: "copilot_here's global Airlock config",
            BUILT_IN: "no config file",
        }[self.kind]

    @property
    def logging(self) -> str:
        """The traffic log as the policy decided it (Policy.build forces it on in monitor)."""
        if not self.policy.log_to_file:
            return "off"
        return "on" if self.config.log_to_file else "on (forced by monitor mode)"

    @property
    def repository(self) -> str | None:
        return repository_of(self.values)

    def repository_note(self) -> str | None:
        """What the placeholders were filled with, or what was left out without a value;
        None when no rule in force names them."""
        if self.policy.mode is Mode.ALLOW_ALL or not self.templated:
            return None
        if self.unfilled:
            return (
                "No GitHub repository for this project (no github.com origin remote, or it "
                f"was not passed in): {len(self.unfilled)} rule paths naming "
                "{{GITHUB_OWNER}}/{{GITHUB_REPO}} are left out (pushes to the project's "
                "repository, API calls under it)"
            )
        return (
            f"GitHub repository: {self.repository} (the project's origin remote): "
            "{{GITHUB_OWNER}}/{{GITHUB_REPO}} filled in; git push and API writes go there only"
        )


def repo_config_path(project_dir: Path) -> Path:
    return project_dir / paths.REPO_CONFIG_RELATIVE


def global_config_path(home: Path) -> Path:
    return home / paths.REPO_CONFIG_RELATIVE


def airlock_global_path(home: Path) -> Path:
    return home / AIRLOCK_GLOBAL_RELATIVE


def find_config(project_dir: Path, home: Path) -> tuple[str, Path | None]:
    """Which config is in force. A path that exists wins even if it is broken:
    a broken repo config is an error, never a silent fall-back to global."""
    repo = repo_config_path(project_dir)
    if os.path.lexists(repo):
        return REPO, repo
    glob = global_config_path(home)
    if os.path.lexists(glob):
        return GLOBAL, glob
    airlock = airlock_global_path(home)
    if os.path.lexists(airlock):
        return AIRLOCK_GLOBAL, airlock
    return BUILT_IN, None


def read_config(path: Path, airlock: bool | None = None) -> NetworkConfig:
    """Read and validate one config file. A UTF-8 byte-order mark is accepted (editors
    on Windows write one); anything that is not UTF-8 is a ConfigError naming the fix."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [_unreadable(exc)]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path),
            [
                Problem(
                    "",
                    f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                    "save the file as UTF-8",
                )
            ],
        ) from None
    return parse_config(text, str(path), airlock)


def _unreadable(exc: OSError) -> Problem:
    if isinstance(exc, IsADirectoryError):
        return Problem("", "is a directory, not a file", "move the directory away")
    if isinstance(exc, PermissionError):
        return Problem("", "permission denied", "make the file readable by you (chmod u+r)")
    if isinstance(exc, FileNotFoundError):
        return Problem(
            "", "does not exist (a symlink to a missing file?)", "restore it, or remove the link"
        )
    if isinstance(exc, NotADirectoryError):
        return Problem("", "a component of its path is a file", "make its directory a directory")
    return Problem(
        "", f"cannot read the file ({exc.strerror or exc})", "make it a readable JSON file"
    )


def load_built_in(
    share: Path | None = None, values: Mapping[str, str] | None = None
) -> tuple[Rule, ...]:
    return _built_in(share, values)[0]


def built_in_specs(share: Path | None = None) -> tuple[list[dict[str, object]], tuple[str, ...]]:
    """defaults.json's rules, the package registries' hosts as read-only rules, and the
    package registries whose hosts are not recorded here (a host install)."""
    share = share or paths.share_dir()
    defaults = json.loads((share / "defaults.json").read_text())
    specs = [dict(spec) for spec in defaults.get("allowed_rules", [])]
    registries = [str(name) for name in defaults.get("package_registries", [])]
    from runtime.registries import registry_hosts  # subprocess, sysconfig: with rules only

    hosts = registry_hosts(share)
    if hosts is None:
        return specs, tuple(registries)
    for name in registries:
        # Installs only read (GET, HEAD); publishing, and npm audit's POST, are refused.
        # The image's builder chose these hosts: a corporate mirror on a private
        # address is reachable (the upstream-address check would refuse it).
        specs += [
            {"host": host, "methods": REGISTRY_METHODS, "allow_private_addresses": True}
            for host in hosts.get(name, [])
        ]
    return specs, ()


def _built_in(
    share: Path | None = None, values: Mapping[str, str] | None = None
) -> tuple[tuple[Rule, ...], tuple[str, ...]]:
    """The built-in rules (placeholders filled from `values`), and the package registries
    whose hosts are not recorded."""
    specs, unlisted = built_in_specs(share)
    return built_in_rules(specs, values=values), unlisted


def resolve(
    project_dir: Path,
    home: Path,
    share: Path | None = None,
    values: Mapping[str, str] | None = None,
) -> Resolved:
    """The config in force, compiled; `values` fill {{GITHUB_OWNER}}/{{GITHUB_REPO}}."""
    kind, path = find_config(project_dir, home)
    config = read_config(path, kind == AIRLOCK_GLOBAL or None) if path else NetworkConfig()
    return compile_resolved(kind, path, config, share, values)


def compile_resolved(
    kind: str,
    path: Path | None,
    config: NetworkConfig,
    share: Path | None = None,
    values: Mapping[str, str] | None = None,
) -> Resolved:
    values = dict(values or {})
    source = str(path) if path else BUILT_IN_SOURCE
    built_in: tuple[Rule, ...] = ()
    unlisted: tuple[str, ...] = ()
    templated: tuple[str, ...] = ()
    unfilled: tuple[str, ...] = ()
    if config.enabled:
        specs: list[RuleSpec | Mapping[str, Any]] = list(config.allowed_rules)
        if config.inherit_defaults:
            built_in_list, unlisted = built_in_specs(share)
            built_in = built_in_rules(built_in_list, values=values)
            # A built-in rule a user rule replaces (same host) is not in force.
            overridden = {_host_key(spec.host) for spec in config.allowed_rules}
            specs += [s for s in built_in_list if _host_key(str(s["host"])) not in overridden]
        templated = unfilled_entries(specs, {})
        unfilled = unfilled_entries(specs, values)
    policy = compile_policy(config, source, built_in, values)
    return Resolved(kind, path, config, policy, unlisted, values, templated, unfilled)


def _host_key(host: str) -> str:
    try:
        return normalize_host_pattern(host)
    except HostError:
        return host.lower()
