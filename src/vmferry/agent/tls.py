"""TLS for the agent API: the server's and the client's ``ssl.SSLContext``.

Agents serve HTTPS with a certificate signed by the cluster's CA (the lab makes one, see
:mod:`vmferry.lab.pki`); clients trust that CA alone, not the system store, and check the agent's
address against the certificate's subject alternative names. TLS authenticates the agent to the
client and encrypts the traffic; the client authenticates with the cluster token (a bearer token
inside the TLS session), so every route needs both.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from vmferry.core.errors import ConfigError

__all__ = ["client_context", "server_context"]


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The agent's TLS context (TLS 1.2+).

    Raises:
        ConfigError: the certificate or key cannot be read or do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file} / key {key_file}: {err}"
        ) from err
    return context


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A context that trusts only the cluster CA and checks the agent's name or address.

    Raises:
        ConfigError: the CA file cannot be read.
    """
    # Not create_default_context(): that also trusts the system's CAs.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load the cluster CA {ca_file}: {err}") from err
    return context
