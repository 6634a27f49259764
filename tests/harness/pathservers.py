"""Real upstream servers that decode request paths differently, for the path tests.

- nginx (the Debian package) decodes every escape, `%2F` included, and then
  resolves dot segments: `/repos/x%2f..%2f..%2fadmin` is served as `/admin`.
  A backslash is an ordinary character to it.
- Node's https module with the usual static-file idiom: the WHATWG URL parser
  (`new URL(req.url, base).pathname`, where `\\` is `/`), then
  `decodeURIComponent`, then `path.posix.join`: a backslash climbs too, and `%2F`
  after the parser has resolved the dot segments it saw.

Both serve files from one document root, where `admin` lies outside `/repos/`,
and write one JSON line per request to their own access log saying which path
they served; the tests read those logs to see what really arrived.

    root = build_docroot(workdir / "www")
    ngx = NginxServer.start(topo, workdir / "nginx", address, cert, key, root)
    node = NodeStaticServer.start(topo, workdir / "node", address, cert, key, root)
    ngx.served()  # [{"request_uri": ..., "uri": ..., "status": ...}, ...]
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

ADMIN_SECRET = "admin-secret-outside-repos"
REPO_FILE = "repo file under /repos/"


def build_docroot(root: Path) -> Path:
    """`/repos/x/file.txt` (allowed), `/admin` (outside the allowed prefix)."""
    (root / "repos" / "x").mkdir(parents=True, exist_ok=True)
    (root / "repos" / "x" / "file.txt").write_text(REPO_FILE + "\n")
    (root / "admin").write_text(ADMIN_SECRET + "\n")
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_listening(topo: Any, proc: Popen[Any], address: str, errors: list[Path]) -> None:
    try:
        topo.wait_tcp(topo.net, address, 443, timeout=15, proc=proc)
    except (TimeoutError, RuntimeError) as exc:
        said = " ".join(p.read_text() for p in errors if p.exists())
        raise RuntimeError(f"server did not start: {exc}; it said: {said}") from None


@dataclass
class NginxServer:
    proc: Popen[Any]
    access_log: Path
    error_log: Path

    @classmethod
    def start(
        cls, topo: Any, workdir: Path, address: str, cert: Path, key: Path, root: Path
    ) -> NginxServer:
        binary = shutil.which("nginx", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise RuntimeError("nginx is not installed: run scripts/bootstrap (Debian nginx)")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        access, error = workdir / "access.jsonl", workdir / "error.log"
        conf = workdir / "nginx.conf"
        conf.write_text(
            textwrap.dedent(
                f"""\
                daemon off;
                master_process off;
                worker_processes 1;
                pid {workdir}/nginx.pid;
                error_log {error} info;
                events {{ worker_connections 64; }}
                http {{
                  client_body_temp_path {workdir}/tmp;
                  proxy_temp_path {workdir}/tmp;
                  fastcgi_temp_path {workdir}/tmp;
                  uwsgi_temp_path {workdir}/tmp;
                  scgi_temp_path {workdir}/tmp;
                  default_type text/plain;
                  # $uri is the path nginx served: decoded, dot segments resolved.
                  log_format served escape=json
                    '{{"request_uri":"$request_uri","uri":"$uri","status":$status}}';
                  access_log {access} served;
                  server {{
                    listen {address}:443 ssl;
                    ssl_certificate {cert};
                    ssl_certificate_key {key};
                    root {root};
                  }}
                }}
                """
            )
        )
        stderr = workdir / "stderr.log"
        with stderr.open("w") as out:
            proc = topo.net_popen(
                [binary, "-p", str(workdir), "-e", str(error), "-c", str(conf)],
                stdout=out,
                stderr=out,
            )
        _wait_listening(topo, proc, address, [error, stderr])
        return cls(proc, access, error)

    def served(self) -> list[dict[str, Any]]:
        """One entry per request nginx answered: request_uri, uri (what it served), status."""
        return _read_json_lines(self.access_log)


# The idiom of countless small Node file servers (and of tutorials): parse with the
# WHATWG URL parser, decode, join under the root. Nothing here is ours but the logging.
NODE_SERVER_JS = r"""
const https = require("https");
const fs = require("fs");
const path = require("path");
const [, , address, cert, key, root, log] = process.argv;
const out = fs.openSync(log, "a");
https
  .createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, (req, res) => {
    let served = null;
    try {
      const pathname = new URL(req.url, "https://localhost").pathname;
      served = path.posix.join("/", decodeURIComponent(pathname));
    } catch (e) {}
    let status = 400;
    let body = "bad request\n";
    if (served !== null) {
      try {
        body = fs.readFileSync(path.join(root, served));
        status = 200;
      } catch (e) {
        status = 404;
        body = "not found\n";
      }
    }
    fs.writeSync(out, JSON.stringify({ url: req.url, served: served, status: status }) + "\n");
    res.writeHead(status, { "content-type": "text/plain" });
    res.end(body);
  })
  .listen(443, address, () => console.log("READY"));
"""


@dataclass
class NodeStaticServer:
    proc: Popen[Any]
    access_log: Path
    error_log: Path

    @classmethod
    def start(
        cls, topo: Any, workdir: Path, address: str, cert: Path, key: Path, root: Path
    ) -> NodeStaticServer:
        binary = shutil.which("node", path="/usr/bin:/usr/local/bin")
        if binary is None:
            raise RuntimeError("node is not installed: run scripts/bootstrap (Debian nodejs)")
        workdir.mkdir(parents=True, exist_ok=True)
        script = workdir / "server.js"
        script.write_text(NODE_SERVER_JS)
        access, error = workdir / "access.jsonl", workdir / "error.log"
        with error.open("w") as out:
            proc = topo.net_popen(
                [binary, str(script), address, str(cert), str(key), str(root), str(access)],
                stdout=out,
                stderr=out,
            )
        _wait_listening(topo, proc, address, [error])
        return cls(proc, access, error)

    def served(self) -> list[dict[str, Any]]:
        """One entry per request Node answered: url (as received), served, status."""
        return _read_json_lines(self.access_log)


def wait_for_entries(
    server: NginxServer | NodeStaticServer, count: int, timeout: float = 5
) -> None:
    """Until the server has logged `count` entries (nginx writes its log after the reply)."""
    deadline = time.monotonic() + timeout
    while len(server.served()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
