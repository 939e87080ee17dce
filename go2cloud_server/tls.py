"""The server's self-signed TLS certificate (generated at first start) and its fingerprint.

Files: ``<data-dir>/tls/cert.pem`` (0644) and ``<data-dir>/tls/key.pem`` (0600). Agents pin the
certificate by its fingerprint: ``sha256:`` + lowercase hex of SHA-256 over the DER encoding.
curl pins the public key instead (``--pinnedpubkey``, used by the install one-liner): the SPKI pin
is ``sha256//`` + base64 of SHA-256 over the certificate's DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Iterable, List, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from go2cloud_server.atomicfile import write_atomic
from go2cloud_server.tlspin import pem_fingerprint

log = logging.getLogger(__name__)

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALID_DAYS = 3650


def paths(tls_dir: Path) -> Tuple[Path, Path]:
    return Path(tls_dir) / CERT_NAME, Path(tls_dir) / KEY_NAME


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: List[x509.GeneralName] = []
    seen = set()
    for host in hosts:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def ensure_certificate(tls_dir: Path, hosts: Iterable[str]) -> Tuple[Path, Path]:
    """Create the certificate and key if missing; return (cert path, key path)."""
    tls_dir = Path(tls_dir)
    cert_path, key_path = paths(tls_dir)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    all_hosts = list(hosts) + ["127.0.0.1", "localhost"]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "go2cloud_server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(_san(all_hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(key_path, key_pem, mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    log.info("generated TLS certificate %s (%s)", cert_path, fingerprint(cert_path))
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    """``sha256:<hex>`` of the DER encoding of the PEM certificate at ``cert_path`` (computed by
    :mod:`go2cloud_server.tlspin`, which the operator commands use without importing this module)."""
    return pem_fingerprint(cert_path)


def spki_pin_der(der: bytes) -> str:
    """``sha256//<base64>`` of the SubjectPublicKeyInfo of a DER certificate (curl's format)."""
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def spki_pin(cert_path: Path) -> str:
    """SPKI pin (``sha256//<base64>``) of the PEM certificate at ``cert_path``."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return spki_pin_der(cert.public_bytes(serialization.Encoding.DER))


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx
