"""Synthetic package registries for real clients: an npm project whose lockfile points at
tarballs, and a PEP 503 simple index of wheels, all static files, made deterministically.

    npm = build_npm(root, "npm.registry.test", count=200)   # root/npm/..., npm.project
    py = build_pypi(root, "py.registry.test", count=20)      # root/simple/..., root/wheels/...
    internet = start_static_internet(topo, work, source, root, names=[...])

No real registry or package names: every package is `spk-<word>-<n>` (npm) or
`spw-<word>-<n>` (wheels), the hosts are test names. The same arguments give the same
bytes (fixed seeds, tar and gzip without timestamps), so a lockfile's `integrity` and an
index's `#sha256=` hold across runs.

npm: a dependency DAG (each package depends on 0-4 packages of higher index, so some
are shared and the graph has depth), every package reachable from the project's
direct dependencies, one version each, all hoisted (lockfileVersion 3, `resolved` +
`integrity` sha512, so `npm ci` fetches each tarball once and verifies it). Tarball
sizes: mostly a few KB, a tail up to ~1 MB (JS text plus an incompressible asset).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kelp",
    "lumen",
    "marble",
    "nectar",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "sable",
    "tundra",
    "umber",
    "velvet",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]


def _name(prefix: str, i: int) -> str:
    return f"{prefix}-{WORDS[i % len(WORDS)]}-{i:03d}"


def _js(rng: random.Random, lines: int) -> bytes:
    """Plausible JavaScript text (compresses like real source, ~4-6x)."""
    out = ["'use strict';"]
    for n in range(lines):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        k = rng.randrange(1 << 30)
        out.append(
            f"function {a}_{b}_{n}(input, opts) {{ const v = input == null ? {k} : "
            f"input.{b} ?? opts?.{a}; if (typeof v !== 'number') throw new TypeError("
            f"'{a} {b}: expected a number, got ' + typeof v); return (v * {k % 977}) >>> 0; }}"
        )
    out.append("module.exports = { " + ", ".join(f"f{n}: 1" for n in range(min(lines, 8))) + " };")
    return ("\n".join(out) + "\n").encode()


def _size(rng: random.Random) -> int:
    """Target tarball size in bytes: ~70% 2-20 KB, ~25% 20-200 KB, ~5% 200 KB-1 MB."""
    roll = rng.random()
    if roll < 0.70:
        return rng.randrange(2_000, 20_000)
    if roll < 0.95:
        return rng.randrange(20_000, 200_000)
    return rng.randrange(200_000, 1_000_000)


def _tgz(files: dict[str, bytes]) -> bytes:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 499162500  # npm's fixed date
            tf.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(tar_buf.getvalue())
    return out.getvalue()


@dataclass
class NpmRegistry:
    project: Path  # package.json, package-lock.json, .npmrc
    tarballs: dict[str, str] = field(default_factory=dict)  # name -> resolved URL
    total_bytes: int = 0

    def paths(self) -> dict[str, str]:
        """name -> the tarball's URL path (what the upstream records)."""
        return {n: "/" + u.split("/", 3)[3] for n, u in self.tarballs.items()}


def build_npm(
    root: Path,
    host: str,
    count: int = 200,
    direct: int = 20,
    seed: int = 1,
    foreign: dict[str, str] | None = None,
    project_name: str = "spk-app",
    prefix: str = "npm",
) -> NpmRegistry:
    """`count` packages under root/<prefix>/<name>/-/<name>-1.0.<i>.tgz on https://host,
    and a project at root/project-<project_name> depending on the first `direct` of them.
    Another `prefix` gives the same packages at URLs of their own.

    `foreign`: package name -> another host whose URL its lockfile entry resolves to
    (the tarball is still written under root, so only the host differs): one more
    direct dependency each, to show that a host the rules do not allow is refused."""
    rng = random.Random(seed)
    names = [_name("spk", i) for i in range(count)]
    deps: dict[str, list[str]] = {n: [] for n in names}
    for i in range(direct, count):  # every package has a parent of lower index: reachable
        parent = rng.randrange(max(0, i - 40), i)
        deps[names[parent]].append(names[i])
    for i in range(count):  # extra edges to higher indices: shared deps, depth
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            j = rng.randrange(i + 1, count) if i + 1 < count else None
            if j is not None and names[j] not in deps[names[i]]:
                deps[names[i]].append(names[j])
    reg = NpmRegistry(project=root / f"project-{project_name}")
    lock_packages: dict[str, Any] = {}
    all_names = list(names) + list((foreign or {}).keys())
    for i, name in enumerate(all_names):
        version = f"1.0.{i}"
        my_deps = {d: f"^1.0.{all_names.index(d)}" for d in sorted(deps.get(name, []))}
        manifest: dict[str, Any] = {
            "name": name,
            "version": version,
            "description": f"synthetic package {i} for the secure-proxy benchmarks",
            "main": "index.js",
            "license": "MIT",
        }
        if my_deps:
            manifest["dependencies"] = my_deps
        target = _size(rng)
        files = {"package/package.json": (json.dumps(manifest, indent=2) + "\n").encode()}
        files["package/index.js"] = _js(rng, 20)
        n_lib = rng.randrange(1, 6)
        js_bytes = min(target * 5, 600_000)  # text part, before compression
        for k in range(n_lib):
            files[f"package/lib/{WORDS[k]}.js"] = _js(rng, max(4, js_bytes // n_lib // 230))
        approx = len(_tgz(files))
        if approx < target:  # an incompressible asset for the rest (fonts, wasm, images)
            files["package/assets/data.bin"] = rng.randbytes(target - approx)
        data = _tgz(files)
        rel = f"{prefix}/{name}/-/{name}-{version}.tgz"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        reg.total_bytes += len(data)
        where = (foreign or {}).get(name, host)
        reg.tarballs[name] = f"https://{where}/{rel}"
        entry: dict[str, Any] = {
            "version": version,
            "resolved": reg.tarballs[name],
            "integrity": "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode(),
            "license": "MIT",
        }
        if my_deps:
            entry["dependencies"] = my_deps
        lock_packages[f"node_modules/{name}"] = entry
    top = names[:direct] + list((foreign or {}).keys())
    root_deps = {n: f"^{lock_packages[f'node_modules/{n}']['version']}" for n in top}
    package_json = {
        "name": project_name,
        "version": "1.0.0",
        "private": True,
        "dependencies": root_deps,
    }
    lock = {
        "name": project_name,
        "version": "1.0.0",
        "lockfileVersion": 3,
        "requires": True,
        "packages": {
            "": {"name": project_name, "version": "1.0.0", "dependencies": root_deps},
            **dict(sorted(lock_packages.items())),
        },
    }
    reg.project.mkdir(parents=True, exist_ok=True)
    (reg.project / "package.json").write_text(json.dumps(package_json, indent=2) + "\n")
    (reg.project / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
    # No cafile: it would replace Node's CA list, and the guard's CA is added by
    # NODE_EXTRA_CA_CERTS (the run sets it to the upstream CA when nothing else does).
    (reg.project / ".npmrc").write_text(
        f"registry=https://{host}/{prefix}/\naudit=false\nfund=false\nupdate-notifier=false\n"
    )
    return reg


def _wheel(directory: Path, dist: str, version: str, requires: Sequence[str], size: int) -> Path:
    """A pure-Python wheel built by hand (no build backend), `size` bytes of module text."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    rng = random.Random(dist)
    meta = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    body = ["# synthetic module for the secure-proxy benchmarks"]
    while sum(len(x) + 1 for x in body) < size:
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        body.append(f"def {a}_{b}_{len(body)}(x):\n    return (x * {rng.randrange(997)}) % 65521")
    files = {
        f"{module}/__init__.py": f'VALUE = "{dist} {version}"\n'.encode(),
        f"{module}/core.py": ("\n".join(body) + "\n").encode(),
        f"{info}/METADATA": meta.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: sp-test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zi = zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{module}-{version}-py3-none-any.whl"
    target.write_bytes(buf.getvalue())
    return target


@dataclass
class PyIndex:
    requirements: list[str]  # what to `pip install` (the rest come as dependencies)
    wheels: dict[str, str] = field(default_factory=dict)  # dist -> URL path
    total_bytes: int = 0


def build_pypi(root: Path, host: str, count: int = 20, direct: int = 5, seed: int = 2) -> PyIndex:
    """`count` wheels under root/wheels/ and a PEP 503 index under root/simple/; the first
    `direct` are the requirements, the rest their (transitive) dependencies."""
    rng = random.Random(seed)
    names = [_name("spw", i) for i in range(count)]
    requires: dict[str, list[str]] = {n: [] for n in names}
    for i in range(direct, count):
        requires[names[rng.randrange(max(0, i - 6), i)]].append(names[i])
    for i in range(count - 1):
        if rng.random() < 0.3:
            j = rng.randrange(i + 1, count)
            if names[j] not in requires[names[i]]:
                requires[names[i]].append(names[j])
    index = PyIndex(requirements=names[:direct])
    links = []
    for name in names:
        size = rng.choice((3_000, 8_000, 20_000, 60_000, 200_000))
        wheel = _wheel(root / "wheels", name, "1.0", [f"{r}>=1.0" for r in requires[name]], size)
        data = wheel.read_bytes()
        index.total_bytes += len(data)
        index.wheels[name] = f"/wheels/{wheel.name}"
        page = root / "simple" / name / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()
        page.write_text(
            "<!DOCTYPE html><html><body>"
            f'<a href="/wheels/{wheel.name}#sha256={digest}">{wheel.name}</a>'
            "</body></html>\n"
        )
        links.append(f'<a href="{name}/">{name}</a>')
    (root / "simple" / "index.html").write_text(
        "<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>\n"
    )
    return index


def start_static_internet(
    topo: Any,
    workdir: Path,
    source_path: str,
    root: Path,
    names: Sequence[str],
    record: Path | None = None,
) -> Any:
    """The test internet (tests.harness.upstream) serving `root` as static files over
    HTTPS for `names`: Content-Length, keep-alive (HTTP/1.1), one thread a connection."""
    from .sandbox import Internet
    from .source import python_bin
    from .upstream import UpstreamCA, wait_ready

    ca = UpstreamCA.create(workdir / "ca", names=list(names))
    argv = [python_bin(), "-m", "tests.harness.upstream", "serve", "--root", str(root)]
    argv += ["--cert", str(ca.server_cert), "--key", str(ca.server_key)]
    if record:
        argv += ["--record", str(record)]
    proc = topo.net_popen(argv, env={"PYTHONPATH": source_path}, text=True)
    wait_ready(proc)
    return Internet(topo, ca, proc, list(names), record)
