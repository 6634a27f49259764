"""A git smart-HTTP server for the test internet: `git http-backend` as CGI behind the
upstream server (tests/harness/upstream.py), so `git clone` and `git push` over
HTTPS reach real repositories on the net host.

    root = build_git_root(workdir / "git")          # owner/repo.git bare repositories
    srv = topo.net_popen([python_bin(), "-m", "tests.harness.gitserver", "serve",
                          "--cert", ..., "--key", ..., "--git-root", root, "--record", f])

Requests for `/<owner>/<repo>(.git)/info/refs`, `/git-upload-pack` and `/git-receive-pack`
go to git http-backend (GIT_PROJECT_ROOT=--git-root, every repository exported, pushes
accepted as an authenticated user); everything else is the upstream server's (echo,
static files). Every request is recorded as the upstream records it (`--record`), so a
test can tell what reached the server, and each repository's refs tell what a push left.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote

from .upstream import Handler, build_git_repo, serve

GIT_PATH = re.compile(r"/[^/]+/[^/]+/(?:info/refs|git-upload-pack|git-receive-pack)")
GIT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


class GitHandler(Handler):
    git_root: Path | None = None

    def _handle(self) -> None:
        if self.git_root is not None and GIT_PATH.fullmatch(self.path.split("?", 1)[0]):
            return self._git()
        return super()._handle()

    # Handler binds its do_* to its own _handle: bind them to this one.
    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def _git(self) -> None:
        assert self.git_root is not None
        local = self.connection.getsockname()[0]
        self.recorder.write(ev="request", local=local, method=self.command, path=self.path)
        path, _, query = self.path.partition("?")
        body = self._body()
        env = {
            **GIT_ENV,
            "HOME": str(self.git_root),
            "GIT_PROJECT_ROOT": str(self.git_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "tester",  # receive-pack wants an authenticated user
            "REMOTE_ADDR": self.client_address[0],
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        result = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60
        )
        head, sep, out = result.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, _, out = result.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        if result.returncode != 0 and not head:
            status, out = 500, result.stderr
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env={**GIT_ENV, "HOME": str(cwd)}, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {result.stderr}")
    return result.stdout


def build_git_root(root: Path, with_content: Sequence[str], empty: Sequence[str]) -> Path:
    """Bare repositories `owner/repo.git` under `root`: some with a README, some empty."""
    root.mkdir(parents=True, exist_ok=True)
    for name in with_content:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        build_git_repo(root, f"{name}.git", {"README.md": f"{name} from the test git server\n"})
    for name in empty:
        git("init", "-q", "--bare", "-b", "main", str(root / f"{name}.git"), cwd=root)
    return root


def refs(repository: Path) -> dict[str, str]:
    """ref name -> commit of a bare repository: what pushes left there."""
    out = git("for-each-ref", "--format=%(refname) %(objectname)", cwd=repository)
    return dict(line.split(" ", 1) for line in out.splitlines())


def objects(repository: Path) -> list[str]:
    """Every object file and pack of a bare repository (a push that arrived leaves some)."""
    base = repository / "objects"
    return sorted(
        str(Path(d, f).relative_to(base))
        for d, _, files in os.walk(base)
        for f in files
        if not d.endswith(("info", "objects"))
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.gitserver")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--cert", type=Path, required=True)
    sv.add_argument("--key", type=Path, required=True)
    sv.add_argument("--git-root", type=Path, required=True)
    sv.add_argument("--record", type=Path)
    args = ap.parse_args(argv)
    GitHandler.git_root = args.git_root
    serve(args.cert, args.key, None, [443], [80], args.record, handler=GitHandler)
    print("READY", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
