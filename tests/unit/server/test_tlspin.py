"""The server package's pinning helper: fingerprints computed with the standard library (the
operator commands use them without importing cryptography) are the ones cryptography computes."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from go2cloud_server import tls, tlspin
from go2cloud_server.errors import InvalidInput


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_pem_fingerprint_is_sha256_of_the_der_certificate(tmp_path):
    cert, _ = tls.ensure_certificate(tmp_path / "a", ["cp.example"])
    expected = "sha256:" + hashlib.sha256(_der(cert.read_bytes())).hexdigest()
    assert tlspin.pem_fingerprint(cert) == expected == tls.fingerprint(cert)
    assert tlspin.fingerprint_der(_der(cert.read_bytes())) == expected


def test_a_chain_is_pinned_by_its_first_certificate_and_text_around_is_ignored(tmp_path):
    first, _ = tls.ensure_certificate(tmp_path / "a", ["one.example"])
    second, _ = tls.ensure_certificate(tmp_path / "b", ["two.example"])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"subject=CN = go2cloud_server\n" + first.read_bytes() + b"\n" + second.read_bytes())
    assert tlspin.pem_fingerprint(chain) == tlspin.pem_fingerprint(first) != tlspin.pem_fingerprint(second)


@pytest.mark.parametrize("content", [b"", b"not a certificate\n",
                                     b"-----BEGIN CERTIFICATE-----\nAB$%\n-----END CERTIFICATE-----\n"])
def test_a_file_without_a_pem_certificate_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "cert.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        tlspin.pem_fingerprint(path)


def test_fingerprints_are_normalised_or_refused():
    fp = "sha256:" + "ab" * 32
    assert tlspin.normalise_fingerprint(":".join(["AB"] * 32)) == fp
    assert tlspin.normalise_fingerprint(" SHA256:" + "AB" * 32) == fp
    with pytest.raises(InvalidInput, match="--server-fingerprint"):
        tlspin.normalise_fingerprint("sha256:abc")


def test_check_pin_compares_the_peers_der_certificate():
    class Peer:
        def __init__(self, der: bytes):
            self.der = der

        def getpeercert(self, binary_form: bool = False) -> bytes:
            assert binary_form
            return self.der

    fp = tlspin.fingerprint_der(b"certificate")
    assert tlspin.check_pin(Peer(b"certificate"), fp)
    assert not tlspin.check_pin(Peer(b"another one"), fp)
    assert not tlspin.check_pin(Peer(b""), fp)
    assert tlspin.check_pin(Peer(b"anything"), None)  # no pin: the context checked the CAs


def test_pinned_adapter_is_built_on_first_use():
    adapter = tlspin.PinnedAdapter("sha256:" + "cd" * 32)
    assert adapter._fingerprint == "cd" * 32
    assert tlspin.PinnedAdapter is type(adapter)  # made once
    session = tlspin.pinned_session("sha256:" + "cd" * 32)
    assert isinstance(session.get_adapter("https://127.0.0.1:1/"), tlspin.PinnedAdapter)
    assert session.verify is False
    with pytest.raises(AttributeError):
        tlspin.NoSuchThing  # noqa: B018
