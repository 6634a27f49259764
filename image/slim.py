"""Keep out of the image what the runtime never runs (image size, issue "Performance").

    python3 image/slim.py trim VENV     builder stage, on the dependency venv
    VENV/bin/python image/slim.py warm  final stage, after our distribution is in

trim: removes from the venv what transparent mode never imports and cannot run
without the packages image/runtime-requirements.txt leaves out (mitmproxy's console
and web UI with their static files, the onboarding app, the mitmproxy/mitmweb/mitmdump
scripts), the test suites shipped inside packages, and every .pyc (the venv is
installed with --no-compile; `warm` writes the ones that matter).

warm: imports what the runtime's processes import (every module of our container
side and the firewall, supervisord and its RPC, iptc, the interceptor's master, a
CA and a leaf certificate made, the content codecs), as root, so Python writes the
bytecode of exactly those modules, in the venv and in the standard library (the
Dockerfile removes the stdlib's .pyc that its own apt layer brought). proxy-user
cannot write __pycache__: a module missing here is compiled in memory at each
start (slower, never wrong). Prints how much bytecode it wrote.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

#: Under site-packages: never imported by transparent mode.
TRIM_DIRS = (
    "mitmproxy/tools/web",
    "mitmproxy/tools/console",
    "mitmproxy/addons/onboardingapp",
    "supervisor/tests",
    "supervisor/medusa/test",
    "h11/tests",
    "pyparsing/diagram",
)
#: Under bin/: mitmproxy's own tools need the console/web/onboarding packages.
TRIM_SCRIPTS = ("mitmproxy", "mitmweb", "mitmdump")

#: Packages whose every module (but host and tests) the runtime may import.
WARM_PACKAGES = ("runtime.container", "firewall", "supervisor")
WARM_MODULES = (
    "runtime.paths",
    "runtime.resolve",
    "runtime.policyfile",
    "runtime.trafficlog",
    "runtime.fsutil",
    "iptc",
    "publicsuffixlist",  # the config's wildcard check, imported on first use
    "hashlib",
    "certifi",
    "watchdog.observers",
    "watchdog.events",
    "watchdog.observers.inotify",
    "mitmproxy.net.encoding",
    "xmlrpc.client",
    "http.client",
)
SKIP = (".tests", ".test", ".__main__", "supervisor.medusa", "runtime.host")


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"slim: no site-packages under {venv}")
    return found[0]


def trim(venv: Path) -> int:
    site = site_packages(venv)
    freed = 0
    for rel in TRIM_DIRS:
        target = site / rel
        if target.is_dir():
            freed += sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            shutil.rmtree(target)
    for name in TRIM_SCRIPTS:
        script = venv / "bin" / name
        if script.exists():
            freed += script.stat().st_size
            script.unlink()
    for cache in list(site.rglob("__pycache__")):
        freed += sum(f.stat().st_size for f in cache.iterdir())
        shutil.rmtree(cache)
    print(f"slim trim: {freed / 1e6:.1f} MB removed from {venv}")
    return 0


def _import_all(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
        if not info.name.endswith(SKIP) and not any(s + "." in info.name for s in SKIP):
            importlib.import_module(info.name)


def _run_interceptor_start() -> None:
    import asyncio

    from mitmproxy.certs import DEFAULT_DHPARAM, CertStore
    from mitmproxy.net import encoding

    import runtime.container.interceptor.main as interceptor
    from runtime.container.ca import new_ca

    async def build() -> None:
        interceptor.make_master()

    asyncio.run(build())
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = new_ca()  # the CA as the init makes it (P-256)
        (Path(tmp) / "warm-ca.pem").write_bytes(key + cert)
        (Path(tmp) / "warm-dhparam.pem").write_bytes(DEFAULT_DHPARAM)
        store = CertStore.from_store(tmp, "warm", 2048)
        store.get_cert("warm.test", ["warm.test"])
    for codec in ("gzip", "deflate", "br", "zstd"):
        encoding.decode(encoding.encode(b"warm", codec), codec)


def warm() -> int:
    if sys.flags.dont_write_bytecode:
        raise SystemExit("slim warm: unset PYTHONDONTWRITEBYTECODE (the point is to write it)")
    for name in WARM_MODULES:
        importlib.import_module(name)
    for package in WARM_PACKAGES:
        _import_all(package)
    _run_interceptor_start()
    roots = (Path(sysconfig.get_path("purelib")), Path(sysconfig.get_path("stdlib")))
    written = {
        root: sum(p.stat().st_size for p in root.rglob("*.pyc")) for root in roots if root.is_dir()
    }
    for root, size in written.items():
        print(f"slim warm: {size / 1e6:.1f} MB of bytecode under {root}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "trim":
        return trim(Path(argv[1]))
    if argv == ["warm"]:
        os.umask(0o022)
        return warm()
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
