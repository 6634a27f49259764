"""Real package managers through the guard: `npm ci` and `pip install` inside
`copilot_here --engine sandbox` in enforce mode, with only the registry hosts allowed.

The registries are static files in the test internet (tests/harness/registry.py:
synthetic, deterministic, no real names): 20 npm packages with a dependency graph and
a lockfileVersion 3 lockfile whose sha512 integrity npm verifies, and 3 wheels behind
a PEP 503 index whose #sha256= pip verifies. A second project has one more package
whose lockfile entry resolves to a host the rules do not allow: its `npm ci` must
fail, and the upstream's own record must show that nothing for that host arrived.

One sandbox run does the three steps, each in its own subshell ending in a marker
line; the tests read its output, the upstream's record and the traffic log.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.registry import (
    NpmRegistry,
    PyIndex,
    build_npm,
    build_pypi,
    start_static_internet,
)
from tests.harness.sandbox import enforce, run_cli, sh, write_config
from tests.harness.upstream import read_records

pytestmark = pytest.mark.e2e

NPM_HOST = "npm.registry.test"
PY_HOST = "py.registry.test"
STRAY_HOST = "cdn.registry.test"  # served by the same upstream, not in the rules
STRAY = "spk-offsite-020"
APP_UID = 1000  # the sandbox's appuser when the CLI runs as root

SCRIPT = """
cd /work
CA="$SSL_CERT_FILE"  # the guard's bundle (the system roots plus its CA)
(
  npm ci --cafile "$CA" --cache "$(mktemp -d)" --no-audit --no-fund >/tmp/npm.out 2>&1
  echo "NPM rc=$? installed=$(ls node_modules | wc -l)"
  node -e "for (const n of process.argv.slice(1)) require(n); console.log('NPM-REQUIRE ok')" \\
    {top} || sed 's/^/NPMERR /' /tmp/npm.out | tail -20
)
(
  cd /work/stray
  npm ci --cafile "$CA" --cache "$(mktemp -d)" --no-audit --no-fund --fetch-retries=0 \\
    >/tmp/stray.out 2>&1
  echo "STRAY rc=$?"
  sed 's/^/STRAYOUT /' /tmp/stray.out | tail -20
)
(
  V=$(mktemp -d)/venv
  /usr/bin/python3 -m venv "$V"
  "$V/bin/pip" install -q --no-cache-dir --disable-pip-version-check --cert "$CA" \\
    --index-url https://{py_host}/simple/ {requirements} >/tmp/pip.out 2>&1
  echo "PIP rc=$? installed=$("$V/bin/pip" list 2>/dev/null | grep -c '^spw-')"
  "$V/bin/python" -c "import sys, importlib; [importlib.import_module(m) for m in sys.argv[1:]]; \\
print('PIP-IMPORT ok')" {modules} || sed 's/^/PIPERR /' /tmp/pip.out | tail -20
)
echo END
"""


@dataclass
class Outcome:
    lines: list[str]
    records: list[dict[str, Any]]  # the upstream's own account
    log: list[dict[str, Any]]  # the traffic log's http lines
    npm: NpmRegistry
    stray: NpmRegistry
    py: PyIndex

    def requests(self, host: str) -> list[str]:
        return [r["path"] for r in self.records if r["ev"] == "request" and r["host"] == host]

    def logged(self, host: str, phase: str = "start") -> list[dict[str, Any]]:
        return [e for e in self.log if e["host"] == host and e["phase"] == phase]


@pytest.fixture(scope="module")
def outcome(module_topology, staged_source) -> Iterator[Outcome]:
    work = Path(tempfile.mkdtemp(prefix="sp-realwork-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        root = work / "www"
        npm = build_npm(root, NPM_HOST, count=20, direct=5)
        # The same 20 packages at URLs of their own (/npm-b/), so what this project's
        # aborted npm ci fetched is told apart, and one more on another host.
        stray = build_npm(
            root,
            NPM_HOST,
            count=20,
            direct=5,
            foreign={STRAY: STRAY_HOST},
            project_name="stray",
            prefix="npm-b",
        )
        py = build_pypi(root, PY_HOST, count=3, direct=1)
        record = work / "upstream.jsonl"
        internet = start_static_internet(
            module_topology, work, staged_source, root, [NPM_HOST, PY_HOST, STRAY_HOST], record
        )
        project = npm.project
        shutil.copytree(stray.project, project / "stray")
        write_config(project, enforce(NPM_HOST, PY_HOST), state=str(work / "state"))
        for p in (project, *project.rglob("*")):
            os.lchown(p, APP_UID, APP_UID)
        home = work / "home"
        home.mkdir(mode=0o777)
        script = SCRIPT.format(
            top=" ".join(list(npm.tarballs)[:5]),
            py_host=PY_HOST,
            requirements=" ".join(py.requirements),
            modules=" ".join(n.replace("-", "_") for n in py.wheels),
        )
        logs = work / "logs"
        env = {"HOME": str(home), "XDG_STATE_HOME": str(work / "state")}
        args = ["--logs-dir", str(logs), "--", *sh(script)]
        try:
            r = run_cli(project, args, internet, timeout=300, env=env)
        finally:
            module_topology.stop(internet.proc)
        assert r.returncode == 0, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert lines[-1:] == ["END"], r.stdout  # every step ran
        log = [
            json.loads(x)
            for p in logs.rglob("traffic.jsonl")
            for x in p.read_text().splitlines()
            if x
        ]
        http = [e for e in log if e.get("kind") == "http"]
        yield Outcome(lines, read_records(record), http, npm, stray, py)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_npm_ci_fetches_every_tarball_through_the_guard_and_logs_each(outcome: Outcome) -> None:
    out = "\n".join(outcome.lines)
    assert "NPM rc=0 installed=20" in outcome.lines, out
    assert "NPM-REQUIRE ok" in outcome.lines, out
    wanted = sorted(outcome.npm.paths().values())
    # The upstream received each tarball once (the stray project's are under /npm-b/).
    got = [p for p in outcome.requests(NPM_HOST) if p.startswith("/npm/")]
    assert sorted(got) == wanted, got
    # Each fetch is in the traffic log, allowed by the registry's rule, and completed.
    logged = [e for e in outcome.logged(NPM_HOST) if e["path"].startswith("/npm/")]
    assert sorted(e["path"] for e in logged) == wanted, logged
    assert {(e["action"].lower(), e["mode"], e["method"]) for e in logged} == {
        ("allow", "enforce", "GET")
    }, logged
    ends = [e for e in outcome.logged(NPM_HOST, "end") if e["path"].startswith("/npm/")]
    assert sorted(e["path"] for e in ends) == wanted, ends
    assert {e["status"] for e in ends} == {200}, ends


def test_pip_install_fetches_index_and_wheels_through_the_guard(outcome: Outcome) -> None:
    out = "\n".join(outcome.lines)
    assert "PIP rc=0 installed=3" in outcome.lines, out
    assert "PIP-IMPORT ok" in outcome.lines, out
    got = outcome.requests(PY_HOST)
    for path in outcome.py.wheels.values():
        assert got.count(path) == 1, (path, got)
    pages = {f"/simple/{name}/" for name in outcome.py.wheels}
    assert pages <= set(got), got
    logged = outcome.logged(PY_HOST)
    assert sorted(e["path"] for e in logged) == sorted(got), logged
    assert {e["action"].lower() for e in logged} == {"allow"}, logged


def test_a_tarball_on_a_host_the_rules_do_not_allow_fails_npm_ci(outcome: Outcome) -> None:
    out = "\n".join(outcome.lines)
    rc = next(x for x in outcome.lines if x.startswith("STRAY rc="))
    assert rc != "STRAY rc=0", out
    assert STRAY_HOST in out and "403" in out, out  # npm says which fetch was refused
    # Checked at the upstream: nothing for that host ever arrived, not even a TLS hello.
    assert outcome.requests(STRAY_HOST) == [], outcome.requests(STRAY_HOST)
    assert [r for r in outcome.records if r.get("sni") == STRAY_HOST] == []
    blocked = outcome.logged(STRAY_HOST)
    assert blocked, outcome.log
    assert {(e["action"].lower(), e["path"]) for e in blocked} == {
        ("block", "/" + outcome.stray.tarballs[STRAY].split("/", 3)[3])
    }, blocked
