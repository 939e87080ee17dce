"""The agent's one pinning implementation (go2cloud_client/tlspin.py): the requests adapter of
the control-plane client pins direct and proxied connections; without a fingerprint, normal TLS."""

from __future__ import annotations

import pytest
from requests.adapters import HTTPAdapter

from go2cloud_client.tlspin import https_adapter, is_canonical_fingerprint

FP = "sha256:" + "ab" * 32


def test_a_pinned_adapter_asserts_the_fingerprint_directly_and_through_a_proxy():
    adapter = https_adapter("SHA256:" + ":".join(["AB"] * 32))  # any accepted spelling
    assert adapter.poolmanager.connection_pool_kw["assert_fingerprint"] == "ab" * 32
    proxied = adapter.proxy_manager_for("http://proxy.invalid:3128")
    assert proxied.connection_pool_kw["assert_fingerprint"] == "ab" * 32
    assert adapter.max_retries.total == 0  # the callers own their retries


def test_without_a_fingerprint_tls_is_verified_normally():
    adapter = https_adapter(None)
    assert type(adapter) is HTTPAdapter
    assert "assert_fingerprint" not in adapter.poolmanager.connection_pool_kw


def test_a_malformed_fingerprint_is_refused():
    with pytest.raises(ValueError):
        https_adapter("sha256:1234")


def test_the_wire_form_of_a_fingerprint_is_exact():
    assert is_canonical_fingerprint(FP)
    assert not is_canonical_fingerprint(FP.upper())
    assert not is_canonical_fingerprint(None)
