"""The container's CA, one owner: the init makes it, publishes its certificate and
trusts it; the interceptor only loads it.

A fresh CA per container start, made in the interceptor's confdir before the
interceptor starts: clients' trust (writing the system bundle) then runs while
the firewall and the interceptor come up, instead of after.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from pathlib import Path

from runtime import fsutil, paths
from runtime.container.console import SetupFailed, say

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: Subject of the CA, as mitmproxy names its own (O and CN = the basename).
CA_NAME = paths.CA_BASENAME
#: mitmproxy's own CA lifetime (certs.CA_EXPIRY); the CA is new on every start anyway.
CA_LIFETIME = datetime.timedelta(days=3650)


def new_ca() -> tuple[bytes, bytes]:
    """A CA key (P-256) and its certificate, PEM, with mitmproxy's CA extensions.

    ECDSA, not mitmproxy's RSA 2048: the key is made in ~1 ms instead of 25-150 ms
    (RSA's prime search), each interceptor loads it in ~1 ms instead of the 50-150 ms
    RSA's key check takes, and mitmproxy signs every leaf certificate and every
    handshake with it (leaves share the CA's key), which ECDSA does several times
    faster. Every client the images run (Node, curl, git, Python, pip, .NET, the
    browsers) accepts ECDSA certificates, and mitmproxy offers the ECDSA suites."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_NAME),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(name)
        .issuer_name(name)
        .not_valid_before(now - datetime.timedelta(days=2))  # clock skew, as mitmproxy
        .not_valid_after(now + CA_LIFETIME)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def make_ca(owner: tuple[int, int]) -> bytes:
    """A new CA in the confdir, as mitmproxy's CertStore reads it (<basename>-ca.pem: key
    and certificate, 0600; -ca-cert.pem; -dhparam.pem), owned by `owner` (proxy-user);
    the certificate published at paths.ca_cert(). Returns the certificate (PEM).

    The dhparam file is written here because mitmproxy writes it when it is missing,
    non-atomically, and several interceptor workers start at once."""
    from mitmproxy.certs import DEFAULT_DHPARAM

    key_pem, pem = new_ca()
    confdir = paths.confdir()
    confdir.mkdir(parents=True, exist_ok=True)
    os.chown(confdir, *owner)
    os.chmod(confdir, 0o700)
    for old in confdir.glob(f"{paths.CA_BASENAME}-*"):
        old.unlink()
    for name, data, mode in (
        (paths.CA_KEY_NAME, key_pem + pem, 0o600),
        (paths.CA_CERT_NAME, pem, 0o644),
        (f"{paths.CA_BASENAME}-dhparam.pem", DEFAULT_DHPARAM, 0o644),
    ):
        fsutil.atomic_write(confdir / name, data, mode)
        os.chown(confdir / name, *owner)
    published = paths.ca_cert()
    published.parent.mkdir(parents=True, exist_ok=True)
    published.write_bytes(pem)
    os.chmod(published, 0o644)
    return pem


def check_published_ca(pem: bytes) -> None:
    """The interceptor serves the CA the clients were told to trust: the confdir
    still holds it, and the published certificate is still it."""
    for where in (paths.confdir() / paths.CA_CERT_NAME, paths.ca_cert()):
        try:
            same = where.read_bytes().strip() == pem.strip()
        except OSError:
            same = False
        if not same:
            raise SetupFailed(
                f"the interceptor uses a CA ({where}) other than the one trusted; "
                f"see {paths.component_log_dir()}/interceptor_*.log"
            )


def trust_ca(uid: int, gid: int, pem: bytes) -> dict[str, str]:
    """The container's CA for every common client. Returns env vars for the command.

    The system bundle the clients read (OpenSSL, curl, git, Python's ssl) is
    written directly: the image's own bundle (kept pristine beside it on the first
    start, so a restart never stacks old CAs) plus ours, replaced
    atomically. No update-ca-certificates: it rebuilds every hash link and runs
    its hooks (a Java keystore among them), the slowest step of the start. The
    certificate is also dropped where update-ca-certificates looks, so a later
    run of it by the user keeps trusting us. NODE_EXTRA_CA_CERTS names the
    published certificate (Node reads it only at start).
    """
    bundle = paths.system_ca_bundle()
    # Root's, beside the bundle (not in proxy-user's state): it decides what is trusted.
    pristine = bundle.with_name(bundle.name + ".before-secure-proxy")
    try:
        if not pristine.is_file():
            base = bundle.read_bytes() if bundle.is_file() else b""
            fsutil.atomic_write(pristine, base, 0o644)
        base = pristine.read_bytes()
        data = (base.rstrip(b"\n") + b"\n" if base.strip() else b"") + pem
        fsutil.atomic_write(bundle, data, 0o644)
        dropped = paths.system_ca_file()
        if dropped.parent.is_dir():
            fsutil.atomic_write(dropped, pem, 0o644)
    except OSError:
        # A read-only /etc: a bundle of our own, the system roots plus our CA.
        bundle = paths.run_dir() / "ca-bundle.pem"
        base = paths.system_ca_bundle().read_bytes() if paths.system_ca_bundle().is_file() else b""
        fsutil.atomic_write(bundle, base.rstrip(b"\n") + b"\n" + pem, 0o644)
    env = {
        "NODE_EXTRA_CA_CERTS": str(paths.ca_cert()),
        "SSL_CERT_FILE": str(bundle),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "PIP_CERT": str(bundle),
        "CURL_CA_BUNDLE": str(bundle),
    }
    if (
        any(shutil.which(b) for b in BROWSERS)
        or Path("/ms-playwright").is_dir()
        or os.environ.get("PLAYWRIGHT_BROWSERS_PATH")
    ):
        trust_nss(paths.ca_cert(), uid, gid)
    return env


def trust_nss(ca: Path, uid: int, gid: int) -> None:
    """Browsers read their own NSS database, not the system store."""
    certutil = shutil.which("certutil")
    if not certutil:
        say(
            "[Network] A browser is installed but certutil (libnss3-tools) is not: browsers "
            "will not trust the proxy CA; install libnss3-tools in the image"
        )
        return
    db = paths.CONTAINER_HOME / ".pki" / "nssdb"
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    db.parent.mkdir(parents=True, exist_ok=True)
    os.chown(db.parent, uid, gid)
    if not db.exists():
        db.mkdir()
        os.chown(db, uid, gid)
        subprocess.run(
            [*as_user, certutil, "-d", f"sql:{db}", "-N", "--empty-password"],
            capture_output=True,
            check=False,
        )
    add = ["-A", "-t", "C,,", "-n", "secure-proxy", "-i", str(ca)]
    subprocess.run(
        [*as_user, certutil, "-d", f"sql:{db}", *add],
        capture_output=True,
        check=False,
    )
