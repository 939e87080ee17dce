from __future__ import annotations

import hashlib
import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from go2cloud_server import tls


def test_certificate_generated_once_with_san_and_fingerprint(tmp_path):
    cert_path, key_path = tls.ensure_certificate(tmp_path / "tls", ["10.1.2.3", "cp.example"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"cp.example", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert tls.fingerprint(cert_path) == "sha256:" + hashlib.sha256(der).hexdigest()
    before = cert_path.read_bytes()
    tls.ensure_certificate(tmp_path / "tls", ["other"])
    assert cert_path.read_bytes() == before  # kept: agents pinned it


def test_spki_pin_is_curls_sha256_of_the_public_key(tmp_path):
    import base64

    cert_path, key_path = tls.ensure_certificate(tmp_path / "tls", [])
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert tls.spki_pin(cert_path) == expected and len(expected) == 8 + 44
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert tls.spki_pin_der(cert.public_bytes(serialization.Encoding.DER)) == expected
