"""The lab's CA: private keys 0600, server certificates that verify against the CA alone and
name the agent's address."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from vmferry.agent.tls import client_context, server_context
from vmferry.lab.pki import issue_server_cert, make_ca


@pytest.mark.parametrize("address", ["127.0.0.1", "10.77.0.2"])
def test_server_certificates_name_the_address_and_keys_are_private(
    tmp_path: Path, address: str
) -> None:
    ca = make_ca(tmp_path / "tls")
    issued = issue_server_cert(ca, "host-1", address)
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    for key in (ca.key_file, issued.key_file):
        assert key.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(address)]
    assert cert.issuer == ca.certificate.subject
    # Both contexts load what the lab wrote.
    server_context(issued.cert_file, issued.key_file)
    context = client_context(ca.cert_file)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs()[0]["subject"][-1] == (("commonName", "vmferry lab CA"),)
    assert len(context.get_ca_certs()) == 1  # the lab's CA only, not the system's


def test_host_names_that_are_not_plain_file_names_are_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "tls")
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="bad host name"):
            issue_server_cert(ca, bad, "127.0.0.1")
