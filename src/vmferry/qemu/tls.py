"""TLS for QEMU-to-QEMU traffic: ``tls-creds-x509`` objects and the parameters that use them.

A QEMU that receives a migration (and exports the disk over NBD) is the TLS *server*; the QEMU
that sends is the *client*. The same QEMU plays both roles over its life (it arrives as a
destination and later leaves as a source), so the credential objects are created when a
migration starts (``object-add``), one per role, not at launch: QEMU reads the files then,
after it has dropped root, which is why they are readable by QEMU's group.

Both ends verify the peer (``verify-peer=on``): the destination accepts only a source holding
a client certificate of the same CA, and the source checks the destination's certificate
against the address it connects to (``tls-hostname``).

A QEMU that arrived by a TLS migration keeps ``tls-creds`` in its migration parameters, so
every migration sets them explicitly, to an empty string when it runs in clear.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal

from vmferry.core.errors import ConfigError, QMPCommandError
from vmferry.qemu.session import QmpSession

__all__ = [
    "CREDS_FILES",
    "TLS_CLIENT_ID",
    "TLS_SERVER_ID",
    "Endpoint",
    "add_creds",
    "check_creds_dir",
    "migration_tls_creds",
    "migration_tls_parameters",
    "tls_hostname",
]

logger = logging.getLogger(__name__)

Endpoint = Literal["server", "client"]
TLS_SERVER_ID = "vmferry-tls-server"
TLS_CLIENT_ID = "vmferry-tls-client"
_IDS: dict[Endpoint, str] = {"server": TLS_SERVER_ID, "client": TLS_CLIENT_ID}

# What QEMU's tls-creds-x509 reads from its ``dir`` (docs/system/tls.rst).
CREDS_FILES = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
)


def check_creds_dir(directory: Path) -> Path:
    """Check that ``directory`` holds every file QEMU needs; return it absolute.

    Raises:
        ConfigError: it is not a directory, or files are missing.
    """
    if not directory.is_dir():
        raise ConfigError(f"QEMU TLS directory {directory} does not exist")
    missing = [name for name in CREDS_FILES if not (directory / name).is_file()]
    if missing:
        raise ConfigError(f"QEMU TLS directory {directory} lacks {', '.join(missing)}")
    if "," in str(directory.absolute()):
        raise ConfigError(f"QEMU TLS directory path must not contain ',': {directory}")
    return directory.absolute()


def tls_hostname(uri: str) -> str:
    """The host part of a ``tcp:HOST:PORT`` migration URI (``[v6]`` brackets removed): the
    name the destination's certificate must carry.

    Raises:
        ConfigError: not a tcp: URI.
    """
    if not uri.startswith("tcp:"):
        raise ConfigError(f"not a tcp: migration URI: {uri!r}")
    host, sep, port = uri[len("tcp:") :].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"not a tcp:HOST:PORT migration URI: {uri!r}")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def migration_tls_parameters(creds_id: str | None, hostname: str | None) -> dict[str, object]:
    """``migrate-set-parameters`` arguments for TLS on (``creds_id``) or off (None).

    ``tls-hostname`` matters only on the client (source); the server leaves it empty.
    """
    return {"tls-creds": creds_id or "", "tls-hostname": hostname or ""}


async def add_creds(session: QmpSession, directory: Path, endpoint: Endpoint) -> str:
    """(Re)create this QEMU's credential object for ``endpoint`` from ``directory``; return
    its id. An object left by an earlier migration is replaced, so the files are read anew.

    Raises:
        QMPCommandError: QEMU could not load the credentials (missing or unreadable files,
            a certificate QEMU's checks reject).
        QMPTimeout, QMPConnectError: QEMU did not answer.
    """
    creds_id = _IDS[endpoint]
    with contextlib.suppress(QMPCommandError):
        await session.execute("object-del", {"id": creds_id})
    await session.execute(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": creds_id,
            "dir": str(directory),
            "endpoint": endpoint,
            "verify-peer": True,
        },
    )
    session.logger.info("tls.creds_loaded %s from %s", endpoint, directory)
    return creds_id


async def migration_tls_creds(session: QmpSession) -> str | None:
    """The credential object QEMU's migration uses now (``query-migrate-parameters``), None
    when it runs in clear: what was really in effect, not what was asked for."""
    reply = await session.execute("query-migrate-parameters")
    creds = reply.get("tls-creds")
    return str(creds) if creds else None
