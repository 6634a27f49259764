"""Test "internet" servers for the net host: a test CA, HTTPS + HTTP + WebSocket, static files.

    ca = UpstreamCA.create(workdir / "ca", names=["api.github.com", "git.test"])
    root = workdir / "www"
    build_git_repo(root, "repo.git"); build_simple_index(root, "sp-demo")
    srv = topo.net_popen([python_bin(), "-m", "tests.harness.upstream", "serve",
                          "--cert", ca.server_cert, "--key", ca.server_key, "--root", root])
    wait_ready(srv)

The server answers on ports 443 (TLS) and 80 (plain), IPv4 and IPv6, every address
of the host. For each request that is not a static file it echoes, as JSON, what it
saw: method, raw path, Host header, the TLS server name (SNI), and the local address
the connection arrived on -- so a test can tell which address the proxy dialled.
`Upgrade: websocket` requests get a WebSocket echo server. Any other `Upgrade`, and
every path under `/force101/`, gets `101 Switching Protocols` and then a raw byte
stream (what a hostile server would do to turn the connection into a tunnel).

With `--record FILE` the server appends one JSON line per connection when it is
accepted (`"ev": "open"`) and one when it ends (`"ev": "data"`, with every byte
received on it, after TLS), and one per request as soon as its head is read
(`"ev": "request"`, method, raw path and Host header): the upstream's own account
of what reached it. `/slow/<ms>[/...]` answers only after that many milliseconds.

`/copilot_internal/user` (the Copilot CLI's first request) stands in for GitHub's
sign-in check: 200 only when the `Authorization` header carries the real token
(`token T`, `Bearer T`, or Basic with T as user or password) named by the
environment variable SP_UPSTREAM_REAL_TOKEN (never an argument: tests look for the
token in every process's argv), else 401; each such request is recorded
(`"ev": "auth"`, with the header as it arrived). `/echo-headers` reflects the
request's headers (body, and Authorization in `X-Echo-Authorization`).

`--alt-cert NAME=CERT:KEY` presents another certificate to a client whose SNI is
NAME (e.g. one signed by a CA nobody trusts); every other name gets the main one.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import ipaddress
import json
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# --------------------------------------------------------------------------- CA


@dataclass(frozen=True)
class UpstreamCA:
    """A CA and one server certificate for all the test names (files are PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path, names: Sequence[str], ips: Sequence[str] = ()) -> UpstreamCA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secure-proxy test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        ca_path = directory / "ca.pem"
        ca_path.write_bytes(ca.public_bytes(pem))
        cert_path = directory / "server.pem"
        cert_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
        key_path = directory / "server.key"
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        for path in (ca_path, cert_path):
            path.chmod(0o644)
        key_path.chmod(0o600)
        return cls(ca_path, cert_path, key_path)


# --------------------------------------------------------------------------- static content


def build_git_repo(root: Path, name: str = "repo.git", files: dict[str, str] | None = None) -> Path:
    """A bare repository served by dumb HTTP (static files after `git update-server-info`)."""
    files = files or {"README.md": "hello from the test git server\n"}
    work = root.parent / f"{name}-work"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root.parent),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    work.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "-b", "main", cwd=work)
    for rel, text in files.items():
        (work / rel).write_text(text)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "initial", cwd=work)
    bare = root / name
    git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    git("update-server-info", cwd=bare)
    return bare


def build_wheel(directory: Path, dist: str = "sp-demo", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, built by hand (no build backend, no network)."""
    module = dist.replace("-", "_")
    name = f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f'VALUE = "{dist} {version} installed through the proxy"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: sp-test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record_lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record_lines.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record_lines.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record_lines) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    target.write_bytes(buf.getvalue())
    return target


def build_simple_index(root: Path, dist: str = "sp-demo", version: str = "0.1") -> Path:
    """PEP 503 simple index at /simple/<dist>/ pointing to /packages/<wheel>."""
    wheel = build_wheel(root / "packages", dist, version)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = root / "simple" / dist
    project.mkdir(parents=True, exist_ok=True)
    (root / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{dist}/">{dist}</a></body></html>\n'
    )
    (project / "index.html").write_text(
        "<!DOCTYPE html><html><body>"
        f'<a href="/packages/{wheel.name}#sha256={digest}">{wheel.name}</a>'
        "</body></html>\n"
    )
    return wheel


# --------------------------------------------------------------------------- server


class Recorder:
    """Appends JSON lines to a file, one os.write() each (threads never interleave)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record["t"] = time.time()
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a `--record` file (tests)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class _TeeIO(io.RawIOBase):
    """The connection's receive side, keeping a copy of every byte read from it.

    The request handler reads through a buffer, so bytes it never parses (after a
    bad request line, say) still arrived: the copy is taken below the buffer."""

    def __init__(self, sock: Any, sink: bytearray) -> None:
        self.sock = sock
        self.sink = sink

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.sock.recv_into(buffer)
        self.sink += bytes(memoryview(buffer)[:n])
        return n


CONTENT_TYPES = {
    ".html": "text/html",
    ".whl": "application/octet-stream",
    ".json": "application/json",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sp-upstream"
    root: Path | None = None
    recorder = Recorder(None)
    MAX_RECORDED = 64 * 1024  # markers sit near the start of what a probe sends

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- TLS per connection, in the connection's own thread
    def setup(self) -> None:
        ctx: ssl.SSLContext | None = getattr(self.server, "tls_context", None)
        self.sni = None
        if ctx is not None:
            self.request.settimeout(10)
            self.request = ctx.wrap_socket(self.request, server_side=True)
            self.sni = getattr(self.request, "sp_sni", None)
        else:
            self.request.settimeout(30)
        super().setup()
        self.received = bytearray()
        self.rfile = io.BufferedReader(_TeeIO(self.connection, self.received))

    def finish(self) -> None:
        try:
            local = self.connection.getsockname()
        except OSError:
            local = ("?", 0)
        self.recorder.write(
            ev="data",
            local=local[0],
            port=local[1],
            tls=isinstance(self.connection, ssl.SSLSocket),
            sni=self.sni,
            data=bytes(self.received[: self.MAX_RECORDED]).decode("latin-1"),
        )
        super().finish()

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self) -> Path | None:
        if self.root is None:
            return None
        rel = self.path.split("?", 1)[0].lstrip("/")
        if ".." in rel.split("/"):
            return None
        target = self.root / rel
        if target.is_dir():
            target = target / "index.html"
        return target if target.is_file() else None

    def _handle(self) -> None:
        local = self.connection.getsockname()[0]
        self.recorder.write(
            ev="request",
            local=local,
            method=self.command,
            path=self.path,
            host=self.headers.get("Host"),
        )
        body = self._body()
        if self.path.split("?", 1)[0] == "/copilot_internal/user":
            return self._copilot_user()
        if self.path.split("?", 1)[0] == "/echo-headers":  # a server that reflects them
            echoed = json.dumps(dict(self.headers.items())).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Echo-Authorization", self.headers.get("Authorization", ""))
            self.send_header("Content-Length", str(len(echoed)))
            self.end_headers()
            self.wfile.write(echoed)
            return None
        upgrade = self.headers.get("Upgrade", "")
        if upgrade.lower() == "websocket":
            return self._websocket()
        if upgrade or self.path.startswith("/force101/"):
            return self._switch_to_raw(upgrade or "x-forced")
        static = self._static()
        if static is not None and self.command in ("GET", "HEAD"):
            ctype = CONTENT_TYPES.get(static.suffix, "text/plain")
            return self._send(200, static.read_bytes(), ctype)
        if self.path.split("?", 1)[0].startswith("/bytes/"):
            size = int(self.path.split("?", 1)[0].rsplit("/", 1)[1])
            return self._send(200, b"x" * size, "application/octet-stream")
        if self.path.split("?", 1)[0].startswith("/slow/"):
            time.sleep(int(self.path.split("?", 1)[0].split("/")[2]) / 1000)
            return self._send(200, b"slow\n", "text/plain")
        if self.path.split("?", 1)[0].startswith("/status/"):
            status = int(self.path.split("?", 1)[0].rsplit("/", 1)[1])
            return self._send(status, b"status\n", "text/plain")
        info = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "sni": self.sni,
            "local": self.connection.getsockname()[0],
            "tls": self.sni is not None or isinstance(self.connection, ssl.SSLSocket),
            "body_len": len(body),
            "upgrade": upgrade or None,
        }
        self._send(200, json.dumps(info).encode() + b"\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def _copilot_user(self) -> None:
        """GitHub's answer to a signed-in Copilot user, for the real token only."""
        auth = self.headers.get("Authorization", "")
        real = os.environ.get(REAL_TOKEN_VARIABLE, "")
        ok = bool(real) and carries_token(auth, real)
        self.recorder.write(
            ev="auth", host=self.headers.get("Host"), path=self.path, authorization=auth, ok=ok
        )
        if not ok:
            return self._send(401, b'{"message": "Bad credentials"}\n')
        user = {"login": "sp-test", "copilot_plan": "individual", "chat_enabled": True}
        return self._send(200, json.dumps(user).encode() + b"\n")

    # -- a server that switches to a raw byte stream after 101 (no WebSocket framing)
    def _switch_to_raw(self, protocol: str) -> None:
        self.send_response(101)
        self.send_header("Upgrade", protocol)
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.write(b"UPSTREAM-RAW-HELLO\n")
        self.wfile.flush()
        while True:  # read (and so record) whatever the client relays, echoing it
            chunk = self.rfile.read1(65536)
            if not chunk:
                break
            self.wfile.write(b"upstream got: " + chunk)
            self.wfile.flush()
        self.close_connection = True

    # -- a minimal RFC 6455 echo server
    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                break
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 0x8:  # close: echo it and stop
                self.wfile.write(bytes([0x88, len(data[:125])]) + data[:125])
                self.wfile.flush()
                break
            if opcode == 0x9:  # ping -> pong
                opcode, data = 0xA, data
            if opcode in (0x1, 0x2, 0xA):
                reply = f"echo: {data.decode(errors='replace')}".encode() if opcode == 1 else data
                frame = bytes([0x80 | opcode])
                n = len(reply)
                if n < 126:
                    frame += bytes([n])
                elif n < 65536:
                    frame += bytes([126]) + struct.pack("!H", n)
                else:
                    frame += bytes([127]) + struct.pack("!Q", n)
                self.wfile.write(frame + reply)
                self.wfile.flush()
        self.close_connection = True


REAL_TOKEN_VARIABLE = "SP_UPSTREAM_REAL_TOKEN"


def carries_token(authorization: str, token: str) -> bool:
    """Whether an Authorization value presents `token` (token, Bearer, Basic)."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() in ("token", "bearer"):
        return value == token
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return token in (user, password)
    return False


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up or fail TLS are part of the tests

    def verify_request(self, request: Any, client_address: Any) -> bool:
        local = request.getsockname()
        Handler.recorder.write(ev="open", local=local[0], port=local[1], peer=client_address[0])
        return True

    def __init__(
        self,
        family: int,
        addr: str,
        port: int,
        tls: ssl.SSLContext | None,
        handler: type[Handler] | None = None,
    ) -> None:
        self.address_family = family
        self.tls_context = tls
        super().__init__((addr, port), handler or Handler, bind_and_activate=False)
        if family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.server_bind()
        self.server_activate()


def tls_context(
    cert: Path, key: Path, alt: dict[str, tuple[Path, Path]] | None = None
) -> ssl.SSLContext:
    """The server's context; `alt` maps an SNI name to the (cert, key) shown for it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    others = {name: tls_context(*pair) for name, pair in (alt or {}).items()}

    def remember_sni(sock: Any, name: str | None, _ctx: Any) -> None:
        sock.sp_sni = name
        if name in others:
            sock.context = others[name]

    ctx.sni_callback = remember_sni
    return ctx


def serve(
    cert: Path,
    key: Path,
    root: Path | None,
    https_ports: Sequence[int],
    http_ports: Sequence[int],
    record: Path | None = None,
    handler: type[Handler] | None = None,
    alt_certs: dict[str, tuple[Path, Path]] | None = None,
) -> list[Server]:
    """`handler`: a Handler subclass (tests.harness.gitserver's), else Handler;
    `alt_certs`: SNI name -> (cert, key) shown instead of the main certificate."""
    Handler.root = root
    Handler.recorder = Recorder(record)
    ctx = tls_context(cert, key, alt_certs)
    servers = []
    for ports, tls in ((https_ports, ctx), (http_ports, None)):
        for port in ports:
            for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                srv = Server(family, addr, port, tls, handler)
                threading.Thread(target=srv.serve_forever, daemon=True).start()
                servers.append(srv)
    return servers


def redirect_to_interceptor(topo: Any, proxy_uid: int, port: int = 58080) -> None:
    """The minimal box rule set: TCP 80/443 of every uid but the proxy's goes to the
    interceptor, IPv4 and IPv6 (the real lock is firewall/'s)."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        rule = [
            *(tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"),
            *("-m", "owner", "!", "--uid-owner", str(proxy_uid)),
            *("-m", "multiport", "--dports", "80,443"),
            *("-j", "REDIRECT", "--to-ports", str(port)),
        ]
        result = topo.box_run(rule)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(rule)}: {result.stderr}")


def wait_ready(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """Wait for the serve command's READY line (the server is listening)."""
    result: dict[str, str] = {}

    def read() -> None:
        result["line"] = proc.stdout.readline() if proc.stdout else ""

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    line = result.get("line", "")
    if isinstance(line, bytes):
        line = line.decode()
    if line.strip() != "READY":
        err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        raise RuntimeError(f"upstream server did not start: {line!r} {err!r}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.upstream")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--cert", type=Path, required=True)
    sv.add_argument("--key", type=Path, required=True)
    sv.add_argument("--root", type=Path)
    sv.add_argument("--https-port", type=int, action="append")
    sv.add_argument("--http-port", type=int, action="append")
    sv.add_argument("--record", type=Path, help="append a JSON line per connection here")
    sv.add_argument(
        "--alt-cert",
        action="append",
        default=[],
        metavar="NAME=CERT:KEY",
        help="present CERT (with KEY) to clients whose SNI is NAME",
    )
    args = ap.parse_args(argv)
    alt: dict[str, tuple[Path, Path]] = {}
    for item in args.alt_cert:
        name, _, files = item.partition("=")
        cert, _, key = files.partition(":")
        if not (name and cert and key):
            ap.error(f"--alt-cert {item!r}: expected NAME=CERT:KEY")
        alt[name] = (Path(cert), Path(key))
    serve(
        args.cert,
        args.key,
        args.root,
        args.https_port or [443],
        args.http_port or [80],
        args.record,
        alt_certs=alt,
    )
    print("READY", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
