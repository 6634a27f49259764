"""The sandbox's default uplink: a veth to the host with NAT (what the README's run
command uses). The "internet" here is a namespace of ours routed from the host,
so the request really crosses the host's forwarding and masquerading."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.sandbox import run_cli, sh
from tests.harness.source import python_bin


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def routed_host() -> Iterator[tuple[str, str, Path]]:
    """A namespace behind a veth from the host (198.19.X.0/24) running an HTTP server
    that answers with the client address it saw."""
    tag = secrets.token_hex(3)
    ns, host_if, index = f"spnat-{tag}", f"spn{tag}", 100 + secrets.randbelow(150)
    host_ip, server_ip = f"198.19.{index}.1", f"198.19.{index}.2"
    work = Path(tempfile.mkdtemp(prefix="sp-nat-", dir="/tmp"))
    os.chmod(work, 0o755)
    (work / "server.py").write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = self.client_address[0].encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "    def log_message(self, *a): pass\n"
        "s = http.server.HTTPServer((sys.argv[1], 80), H); print('READY', flush=True)\n"
        "s.serve_forever()\n"
    )
    ip("netns", "add", ns)
    server = None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{server_ip}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, python_bin(), str(work / "server.py"), server_ip],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "READY"
        yield server_ip, host_ip, work
    finally:
        if server is not None:
            server.kill()
            server.wait()
        ip("link", "del", host_if, check=False)
        ip("netns", "del", ns, check=False)
        shutil.rmtree(work, ignore_errors=True)


def sandbox_traces(run_id: str) -> str:
    """Every NAT/forward rule and veth the sandbox run `run_id` left on the host (other
    runs, of other tests on this machine, may come and go meanwhile)."""
    rules = "".join(
        subprocess.run(["iptables-save", "-t", t], capture_output=True, text=True).stdout
        for t in ("nat", "filter")
    )
    # The sandbox's host-side veth is named sp-<run id>.
    links = [line.split(": ")[1] for line in ip("-o", "link", "show").stdout.splitlines()]
    nat = [line for line in rules.splitlines() if f"secure-proxy sandbox {run_id}" in line]
    return "\n".join(nat + [name for name in links if name.startswith(f"sp-{run_id}")])


def test_default_nat_uplink_reaches_a_routed_host_and_cleans_up(routed_host, tmp_path):
    server_ip, host_ip, _ = routed_host
    project = tmp_path / "project"
    project.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(project, 0o755)
    argv = [
        "--add-host",
        f"nat.test:{server_ip}",
        "--",
        *sh("curl -sS --max-time 10 http://nat.test/"),
    ]
    r = run_cli(project, argv, env={"SECURE_PROXY_TRACE": "1"})
    assert r.returncode == 0, r.stderr
    run_id = re.search(r"\[sandbox\] run ([0-9a-f]+):", r.stderr)
    assert run_id, r.stderr
    # The interceptor (proxy-user) fetched it; the host masqueraded the sandbox's
    # address, so the server saw the host's address on its link.
    assert r.stdout.strip() == host_ip, (r.stdout, r.stderr)
    assert sandbox_traces(run_id[1]) == "", "the sandbox left NAT rules or links behind"
