"""The lab's private certificate authority: one CA, one server certificate per agent.

Layout (in ``<lab_dir>/tls/``, keys mode 0600, the directory 0700)::

    ca.pem  ca.key                  the lab's CA (ECDSA P-256, valid 1 year)
    host-N.pem  host-N.key          agent host-N's certificate; SAN = its listen address

and, per agent, the credentials its QEMUs use for the migration stream and the NBD disk mirror
(:func:`issue_qemu_creds`, in a directory of their own, named as QEMU's ``tls-creds-x509``
expects)::

    ca-cert.pem                     the lab's CA certificate
    server-cert.pem server-key.pem  QEMU as a destination (TLS server); SAN = migration address
    client-cert.pem client-key.pem  QEMU as a source (TLS client, mutual TLS)

Clients trust ``ca.pem`` only (the inventory records its path). The CA key stays in the lab
directory so ``lab up`` could add hosts later; whoever can read it can impersonate an agent, as
whoever can read the token can command one — both are the lab owner's files.

Example:
    >>> ca = make_ca(Path("/tmp/lab/tls"))                            # doctest: +SKIP
    >>> issue_server_cert(ca, "host-1", "127.0.0.1")                  # doctest: +SKIP
    ServerCert(cert_file=PosixPath('/tmp/lab/tls/host-1.pem'), key_file=...)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "ServerCert",
    "issue_qemu_creds",
    "issue_server_cert",
    "load_ca",
    "make_ca",
]

_VALIDITY = datetime.timedelta(days=365)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A CA on disk plus its loaded key (to sign with)."""

    cert_file: Path
    key_file: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def directory(self) -> Path:
        return self.cert_file.parent


@dataclass(frozen=True, slots=True)
class ServerCert:
    """An agent's certificate and key files."""

    cert_file: Path
    key_file: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, group: int | None = None) -> None:
    """Write ``key`` 0600, or 0640 owned by ``group`` (a QEMU that dropped root reads it)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 (not chmod-ed after), so the key is never readable by others; the group
    # gets read access only once the group is ours to give.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        if group is not None:
            os.fchown(handle.fileno(), -1, group)
            os.fchmod(handle.fileno(), 0o640)
        handle.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmferry lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(directory: Path) -> CertificateAuthority:
    """Create ``directory`` (0700) with a fresh CA in it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name("vmferry lab CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority(directory / "ca.pem", directory / "ca.key", cert, key)
    _write_key(ca.key_file, key)
    _write_cert(ca.cert_file, cert)
    return ca


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA :func:`make_ca` wrote in ``directory`` (to sign more certificates with).

    Raises:
        OSError: its files cannot be read.
        ValueError: they are not a CA certificate and its EC key.
    """
    cert_file, key_file = directory / "ca.pem", directory / "ca.key"
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file} is not an EC private key")
    return CertificateAuthority(cert_file, key_file, cert, key)


def _sign_leaf(
    ca: CertificateAuthority, common_name: str, address: str, usage: x509.ObjectIdentifier
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for ``address`` (IP or DNS name in the SAN) with one extended usage."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        san = x509.DNSName(address)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # QEMU's sanity check (crypto/tlscredsx509.c) wants both bits when key usage is present.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def _check_host(host: str) -> None:
    if not host or "/" in host or host.startswith("."):
        raise ValueError(f"bad host name for a certificate: {host!r}")


def issue_server_cert(ca: CertificateAuthority, host: str, address: str) -> ServerCert:
    """Sign a server certificate for agent ``host`` listening on ``address`` (IP or DNS name).

    Raises:
        ValueError: ``host`` is not a plain name (it becomes a file name).
    """
    _check_host(host)
    cert, key = _sign_leaf(ca, host, address, ExtendedKeyUsageOID.SERVER_AUTH)
    issued = ServerCert(ca.directory / f"{host}.pem", ca.directory / f"{host}.key")
    _write_key(issued.key_file, key)
    _write_cert(issued.cert_file, cert)
    return issued


def issue_qemu_creds(
    ca: CertificateAuthority,
    host: str,
    address: str,
    directory: Path,
    *,
    group: int | None = None,
) -> Path:
    """Write QEMU's TLS credentials for host ``host`` into ``directory``; return it.

    The server certificate's SAN is ``address``, the host's migration address, which the
    source passes as ``tls-hostname``. Both certificates are signed by ``ca``, and every QEMU
    of the lab trusts ``ca`` alone, so a peer needs a certificate of this lab (mutual TLS).

    Args:
        ca: the lab's CA.
        host: the host's name (the certificates' common name).
        address: the host's migration address.
        directory: created 0700 (0750 with ``group``); keys 0600 (0640 with ``group``).
        group: a group allowed to read the credentials: the one QEMU runs as after it drops
            root (see ``vmferry agent --qemu-user``). None: only the owner reads them.

    Raises:
        ValueError: ``host`` is not a plain name.
        OSError: the directory cannot be written.
    """
    _check_host(host)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if group is not None:
        os.chown(directory, -1, group)
        os.chmod(directory, 0o750)
    else:
        os.chmod(directory, 0o700)
    _write_cert(directory / "ca-cert.pem", ca.certificate)
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert, key = _sign_leaf(ca, f"{host} qemu {role}", address, usage)
        _write_key(directory / f"{role}-key.pem", key, group)
        _write_cert(directory / f"{role}-cert.pem", cert)
    return directory
