"""The container's CA as the init makes it: files mitmproxy's CertStore loads as they
are, a private key, and leaf certificates a client verifies in a real handshake."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mitmproxy.certs import CertStore

from runtime import paths
from runtime.container import ca


@pytest.fixture
def made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    confdir = tmp_path / "state" / "mitmproxy"
    monkeypatch.setenv("SECURE_PROXY_CONFDIR", str(confdir))
    monkeypatch.setenv("SECURE_PROXY_CA_CERT", str(tmp_path / "ca" / "certs" / "ca.pem"))
    confdir.mkdir(parents=True)
    (confdir / "mitmproxy-ca.p12").write_bytes(b"an older run's file")
    pem = ca.make_ca((os.getuid(), os.getgid()))
    return confdir, pem


def test_files_are_mitmproxys_layout_key_private_certificate_published(made) -> None:
    confdir, pem = made
    assert sorted(p.name for p in confdir.iterdir()) == [
        paths.CA_CERT_NAME,
        paths.CA_KEY_NAME,
        "mitmproxy-dhparam.pem",
    ]  # the older run's file is gone, nothing half-written is left
    assert stat.S_IMODE(confdir.stat().st_mode) == 0o700
    assert stat.S_IMODE((confdir / paths.CA_KEY_NAME).stat().st_mode) == 0o600
    assert paths.ca_cert().read_bytes() == pem == (confdir / paths.CA_CERT_NAME).read_bytes()
    assert stat.S_IMODE(paths.ca_cert().stat().st_mode) == 0o644
    assert b"PRIVATE KEY" not in pem


def test_the_ca_is_p256_and_a_ca_for_server_certificates_only(made) -> None:
    confdir, pem = made
    cert = x509.load_pem_x509_certificate(pem)
    key = serialization.load_pem_private_key(
        (confdir / paths.CA_KEY_NAME).read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    cert.verify_directly_issued_by(cert)  # self-signed, signature valid


def test_a_second_ca_is_a_new_key(made) -> None:
    confdir, pem = made
    key = (confdir / paths.CA_KEY_NAME).read_bytes()
    assert ca.make_ca((os.getuid(), os.getgid())) != pem
    assert (confdir / paths.CA_KEY_NAME).read_bytes() != key


def test_mitmproxy_loads_it_as_is_and_a_client_trusting_it_completes_a_handshake(made) -> None:
    """mitmproxy's CertStore reads the files without making its own, and a leaf it
    signs (sharing the CA's key, as mitmproxy's leaves do) passes Python's default
    verification, hostname included, against the published certificate."""
    confdir, _ = made
    before = {p.name: p.read_bytes() for p in confdir.iterdir()}
    store = CertStore.from_store(confdir, paths.CA_BASENAME, 2048)
    assert {p.name: p.read_bytes() for p in confdir.iterdir()} == before
    entry = store.get_cert("api.example.test", [x509.DNSName("api.example.test")])

    leaf = confdir.parent / "leaf.pem"
    leaf.write_bytes(
        entry.cert.to_pem()
        + entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf)
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert()))

    def handshake(hostname: str) -> bytes:
        with socket.create_server(("127.0.0.1", 0)) as listener:

            def serve() -> None:
                conn, _ = listener.accept()
                with (
                    conn,
                    contextlib.suppress(ssl.SSLError, OSError),
                    server_ctx.wrap_socket(conn, server_side=True) as tls,
                ):
                    tls.sendall(b"hello")

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            try:
                with (
                    socket.create_connection(listener.getsockname(), timeout=5) as raw,
                    client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
                ):
                    return tls.recv(5)
            finally:
                thread.join(timeout=5)

    assert handshake("api.example.test") == b"hello"
    with pytest.raises(ssl.SSLCertVerificationError):  # same CA, a name the leaf lacks
        handshake("other.example.test")
