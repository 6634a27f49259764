"""The one installer: lays the runtime onto a root filesystem.

The Dockerfile runs it at build time (`--root /`, dependencies from pip or a
wheel directory) and the sandbox engine runs it at every start inside its own
mount namespace (`--reuse-venv /opt/sp-venv`: no pip, no network, well under a
second). Both produce the same layout, so the image layout is written once
(every path below comes from runtime/paths.py, the one place that names them):

    /opt/secure-proxy/                     defaults.json, schemas, registries.json
    /opt/secure-proxy/venv/                Python env with runtime/, firewall/ and console scripts
    /etc/secure-proxy/supervisor/          supervisord.conf and conf.d/<program>.conf
    /usr/local/bin/supervisorctl           wrapper that finds our supervisord.conf
    /usr/local/bin/secure-proxy-init       wrapper: the container's entrypoint
    /ca/certs/                             proxy-user 0755 (the interceptor writes ca.pem)
    /var/lib/secure-proxy/mitmproxy/       proxy-user 0700 (CA key)
    /var/log/secure-proxy/                 root 0750 (component logs)
    proxy-user                             system account, no login, no home of its own
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

from runtime import fsutil, paths, registries

SOURCE_ROOT = paths.source_root()
PACKAGES = ("runtime", "firewall")
SHARE_FILES = (
    "defaults.json",
    "network.schema.json",
    "traffic-log.schema.json",
)
# Console scripts of our dependencies that the runtime calls.
EXTRA_SCRIPTS = {
    "supervisord": "supervisor.supervisord:main",
    "supervisorctl": "supervisor.supervisorctl:main",
}


class InstallError(Exception):
    pass


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _ignore(directory: str, names: list[str]) -> set[str]:
    # __pycache__ is copied: a .pyc there names its source's mtime and size, which the
    # copy keeps (copy2), so Python uses a valid one and recompiles a stale one.
    if Path(directory).name == "__pycache__":
        return set()
    return {n for n in names if n.endswith((".pyc", ".pyo"))}


def compile_packages(site: Path) -> None:
    """Bytecode for our copied packages, as the image has (slim warm): without it every
    program compiles them at each start (the runtime's directories are root's, the
    services run as proxy-user, and PYTHONDONTWRITEBYTECODE may be set): ~40 ms more per
    program, eight programs at once. Up-to-date ones (copied) are only checked."""
    import compileall

    for pkg in PACKAGES:
        compileall.compile_dir(site / pkg, quiet=2, workers=1)


DIST_NAME = "copilot_here_secure_proxy"  # the distribution's name, as in its dist-info


def is_checkout(source: Path) -> bool:
    """A source checkout (config/, supervisor.d/, pyproject.toml beside the packages), or
    else an installation's site-packages, where the same files ship inside the package
    (runtime/_config, runtime/_supervisor) and the scripts are in the dist-info."""
    return (source / "pyproject.toml").is_file()


def share_file(source: Path, name: str) -> Path:
    return source / ("config" if is_checkout(source) else "runtime/_config") / name


def supervisor_confs(source: Path) -> list[Path]:
    directory = source / ("supervisor.d" if is_checkout(source) else "runtime/_supervisor")
    confs = sorted(directory.glob("*.conf"))
    if not confs:
        raise InstallError(f"no supervisor configuration (*.conf) in {directory}")
    return confs


def console_scripts(source: Path) -> dict[str, str]:
    if is_checkout(source):
        data = tomllib.loads((source / "pyproject.toml").read_text())
        return dict(data["project"]["scripts"])
    found = sorted(source.glob(f"{DIST_NAME}-*.dist-info/entry_points.txt"))
    if not found:
        raise InstallError(f"neither pyproject.toml nor {DIST_NAME}-*.dist-info in {source}")
    entry_points = configparser.ConfigParser(interpolation=None)
    entry_points.optionxform = str  # type: ignore[assignment,method-assign]  # keep case
    entry_points.read(found[-1], encoding="utf-8")
    return dict(entry_points["console_scripts"])


def _lookup_id(root: Path, db: str, name: str) -> int | None:
    try:
        lines = (_under(root, Path("/etc")) / db).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split(":")
        if fields[0] == name and len(fields) > 2:
            return int(fields[2])
    return None


def ensure_proxy_user(root: Path, name: str = paths.PROXY_USER) -> tuple[int, int]:
    """A system account for the interceptor: only its traffic leaves the box."""
    if _lookup_id(root, "passwd", name) is None:
        argv = ["useradd", "--system", "--user-group", "--no-create-home"]
        argv += ["--home-dir", str(paths.state_dir()), "--shell", "/usr/sbin/nologin", name]
        if root != Path("/"):
            argv[1:1] = ["--root", str(root)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise InstallError(f"useradd {name} failed: {result.stderr.strip()}")
    uid = _lookup_id(root, "passwd", name)
    gid = _lookup_id(root, "group", name)
    if uid is None or gid is None:
        raise InstallError(f"{name} missing from {root}/etc/passwd or group after useradd")
    return uid, gid


def _mkdir(path: Path, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    fsutil.atomic_write(path, text, mode)


def _script(python: Path, target: str) -> str:
    module, func = target.split(":")
    return f"#!{python}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise InstallError(f"no site-packages under {venv}")
    return found[0]


def _base_python(reuse: Path) -> str:
    """The interpreter a venv was made from (pyvenv.cfg `home`)."""
    cfg = reuse / "pyvenv.cfg"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                version = sys.version_info
                for name in (f"python{version.major}.{version.minor}", "python3"):
                    candidate = Path(value.strip()) / name
                    if candidate.exists():
                        return str(candidate)
    return str(reuse / "bin" / "python3")


def deps_pth(reused: Path) -> str:
    """The thin venv's .pth line: the reused site dir, and its own .pth files read as a
    site dir's are (packages some .pth adds included), but for an editable install of
    this project: ours is copied in, and that finder would point back at the checkout
    and cost every program's start ~10 ms (it imports pathlib, re, urllib)."""
    ours = f"__editable__.{DIST_NAME}-"
    names = sorted(p.name for p in reused.glob("*.pth") if not p.name.startswith(ours))
    where = repr(str(reused))
    reads = "".join(f"; site.addpackage({where}, {name!r}, None)" for name in names)
    return f"import site, sys; sys.path.append({where}){reads}\n"


def install_venv_reusing(root: Path, source: Path, reuse: Path) -> Path:
    """A thin venv whose dependencies come from an existing one (a .pth line): seconds
    become milliseconds. Our packages are copied in, so the runtime cannot change
    under a running sandbox when the checkout changes."""
    venv = _under(root, paths.venv_dir())
    if venv.exists():
        shutil.rmtree(venv)
    base = _base_python(reuse)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = _site_packages(venv)
    (site / "secure-proxy-deps.pth").write_text(deps_pth(_site_packages(reuse)))
    for pkg in PACKAGES:
        shutil.copytree(source / pkg, site / pkg, ignore=_ignore)
    compile_packages(site)
    python = paths.venv_dir() / "bin" / "python"
    scripts = {**console_scripts(source), **EXTRA_SCRIPTS}
    for name, target in scripts.items():
        _write(venv / "bin" / name, _script(python, target), 0o755)
    return venv


def pip_command(venv: Path, wheels: Path | None) -> list[str]:
    """The venv's own pip, or else pip run from its wheel in the wheel directory (the
    image: the venv copied from the builder has no pip, and gets none)."""
    own = venv / "bin" / "pip"
    if own.exists():
        return [str(own)]
    found = sorted(wheels.glob("pip-*.whl")) if wheels else []
    if not found:
        raise InstallError(f"no pip in {venv}/bin and no pip-*.whl in {wheels or '--wheels'}")
    return [str(venv / "bin" / "python"), f"{found[-1]}/pip"]


def install_venv_pip(root: Path, source: Path, wheels: Path | None, no_deps: bool = False) -> Path:
    """The image build: a real venv, our distribution (and its dependencies unless
    `no_deps`: the image's builder installed them from image/runtime-requirements.txt)
    from pip. A venv already there is used as it is."""
    if root != Path("/"):
        raise InstallError("a pip-built venv has absolute paths: install it with --root /")
    venv = paths.venv_dir()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # No bytecode here: image/slim.py warm writes it for what the runtime imports.
    argv = [*pip_command(venv, wheels), "install", "--no-cache-dir", "--no-compile"]
    if no_deps:
        argv.append("--no-deps")
    target = str(source)
    if wheels:
        argv += ["--no-index", "--find-links", str(wheels)]
        # Our own wheel is among them when the builder made it: install it by name,
        # so nothing is built in the final stage.
        name = tomllib.loads((source / "pyproject.toml").read_text())["project"]["name"]
        normalized = name.replace("-", "_")
        if any(wheels.glob(f"{normalized}-*.whl")):
            target = name
    subprocess.run([*argv, target], check=True)
    return venv


def install(
    root: Path = Path("/"),
    source: Path = SOURCE_ROOT,
    reuse_venv: Path | None = None,
    wheels: Path | None = None,
    skip_venv: bool = False,
    no_deps: bool = False,
) -> dict[str, object]:
    started = time.monotonic()
    root = root.resolve()
    prefix = _under(root, paths.prefix_dir())
    _mkdir(prefix, 0o755)
    for name in SHARE_FILES:
        shutil.copyfile(share_file(source, name), prefix / name)
        os.chmod(prefix / name, 0o644)
    hosts = registries.record(prefix, sorted(wheels.glob("pip-*.whl")) if wheels else ())
    os.chmod(prefix / registries.REGISTRIES_FILE, 0o644)

    if reuse_venv and not skip_venv:
        install_venv_reusing(root, source, reuse_venv)
    elif not skip_venv:
        install_venv_pip(root, source, wheels, no_deps)

    sup = _under(root, paths.supervisor_dir())
    (sup / "conf.d").mkdir(parents=True, exist_ok=True)
    for conf in supervisor_confs(source):
        target = sup / conf.name if conf.name == "supervisord.conf" else sup / "conf.d" / conf.name
        shutil.copyfile(conf, target)
        os.chmod(target, 0o644)

    bindir = _under(root, paths.wrapper_bin_dir())
    venv_bin = paths.venv_dir() / "bin"
    _write(
        bindir / "supervisorctl",
        f'#!/bin/sh\nexec {venv_bin}/supervisorctl -c {paths.supervisor_conf()} "$@"\n',
        0o755,
    )
    _write(
        bindir / "secure-proxy-init", f'#!/bin/sh\nexec {venv_bin}/secure-proxy-init "$@"\n', 0o755
    )

    uid, gid = ensure_proxy_user(root)
    ca_dir = paths.ca_dir()
    _mkdir(_under(root, ca_dir.parent), 0o755)
    _mkdir(_under(root, ca_dir), 0o755, (uid, gid))
    _mkdir(_under(root, paths.state_dir()), 0o700, (uid, gid))
    _mkdir(_under(root, paths.confdir()), 0o700, (uid, gid))
    _mkdir(_under(root, paths.component_log_dir()), 0o750)
    manifest = {
        "source": str(source),
        "venv": "reused " + str(reuse_venv) if reuse_venv else ("none" if skip_venv else "pip"),
        "registries": hosts,
        "proxy_user": [uid, gid],
        "python": sysconfig.get_python_version(),
        "seconds": round(time.monotonic() - started, 3),
    }
    _write(prefix / "install.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="secure-proxy-install", description="Lay the secure proxy runtime onto a root fs."
    )
    ap.add_argument("--root", type=Path, default=Path("/"), help="root filesystem (default /)")
    ap.add_argument("--source", type=Path, default=SOURCE_ROOT, help="source checkout")
    venv = ap.add_mutually_exclusive_group()
    venv.add_argument(
        "--reuse-venv", type=Path, help="take dependencies from this venv instead of pip"
    )
    venv.add_argument("--wheels", type=Path, help="pip install offline from this wheel dir")
    venv.add_argument("--skip-venv", action="store_true", help="venv already in place")
    ap.add_argument(
        "--no-deps",
        action="store_true",
        help="pip: our distribution only, its dependencies are in the venv already",
    )
    args = ap.parse_args(argv)
    try:
        manifest = install(
            args.root, args.source, args.reuse_venv, args.wheels, args.skip_venv, args.no_deps
        )
    except (InstallError, subprocess.CalledProcessError, OSError) as exc:
        print(f"secure-proxy-install: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
