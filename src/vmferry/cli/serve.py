"""``vmferry serve``: run the controller as a service for the lab's cluster (see
:mod:`vmferry.service`). Prints where it answers and where its tokens are; logs to stderr.

HTTPS by default: with ``--tls-cert``/``--tls-key``, or, in a lab, with a certificate the lab's
CA signs for the listen address (clients then trust the lab CA, as they do for the agents).
``--insecure-http`` serves plain HTTP (a lab on loopback only: tokens travel in clear).

``--store postgresql://…`` (or ``$VMFERRY_STORE``) keeps the state in PostgreSQL, where several
services share it: one leads, the others follow (see :mod:`vmferry.service.server`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from vmferry.agent.tls import server_context
from vmferry.cli.exits import EXIT_OK
from vmferry.controller.inventory import Inventory, default_lab_dir
from vmferry.core.errors import ConfigError
from vmferry.service.auth import Role
from vmferry.service.pg import redact
from vmferry.service.server import Listening, ServiceConfig, run_service

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["serve"]


def _listen(text: str) -> tuple[str, int]:
    """Raises: ConfigError: not ADDR:PORT."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen must be ADDR:PORT, got {text!r}")
    return host, int(port)


def _lab_certificate(inventory: Inventory, address: str, state_dir: Path) -> ssl.SSLContext:
    """A certificate for ``address`` signed by the lab's CA.

    Raises:
        ConfigError: the lab has no CA (or it cannot be read), or the address is a wildcard.
    """
    from vmferry.lab import pki

    if inventory.ca_file is None:
        raise ConfigError("the lab has no CA: give --tls-cert and --tls-key (or --insecure-http)")
    try:
        unspecified = ipaddress.ip_address(address).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        raise ConfigError(
            f"--listen {address}: a lab certificate names one address; give it, or "
            "--tls-cert and --tls-key for a certificate with the host's names"
        )
    try:
        ca = pki.load_ca(inventory.ca_file.parent)
        issued = pki.issue_server_cert(ca, "serve", address)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot sign a certificate with the lab CA: {err}") from err
    return server_context(issued.cert_file, issued.key_file)


def _tls(
    args: argparse.Namespace, inventory: Inventory, address: str, state_dir: Path
) -> ssl.SSLContext | None:
    if args.insecure_http:
        if args.tls_cert or args.tls_key:
            raise ConfigError("--insecure-http and --tls-cert/--tls-key exclude each other")
        return None
    if args.tls_cert and args.tls_key:
        return server_context(args.tls_cert, args.tls_key)
    if args.tls_cert or args.tls_key:
        raise ConfigError("--tls-cert and --tls-key go together")
    return _lab_certificate(inventory, address, state_dir)


async def serve(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``serve [--listen ADDR:PORT] [--state-dir DIR]``: serve until stopped."""
    host, port = _listen(args.listen)
    lab_dir = default_lab_dir()
    inventory = Inventory.load(lab_dir)  # refuses when there is no lab
    if not 0 < args.grace <= 3600:
        raise ConfigError("--grace must be in (0, 3600] seconds")
    state_dir = args.state_dir or lab_dir / "serve"
    tls = _tls(args, inventory, host, state_dir)
    store_url = args.store or os.environ.get("VMFERRY_STORE") or None
    config = ServiceConfig(
        listen_host=host,
        listen_port=port,
        state_dir=state_dir,
        database=inventory.history_db,
        lab_dir=lab_dir,
        tls=tls,
        ready_file=args.ready_file,
        grace_s=args.grace,
        store_url=store_url,
        lease_s=args.lease,
    )

    def listening(where: Listening) -> None:
        out.print(f"vmferry serve: listening on {where.url}", highlight=False)
        for role in Role:
            out.print(f"{role} token: {where.tokens[role]}", highlight=False)
        if tls is not None and not args.tls_cert and inventory.ca_file is not None:
            out.print(f"clients trust the lab CA: {inventory.ca_file}", highlight=False)
        out.print(f"dashboard: {where.url}/ (log in with a token above)", highlight=False)
        if store_url is not None:
            out.print(
                f"state in PostgreSQL ({redact(store_url)}): leading once it holds the lease",
                highlight=False,
            )
        out.print(
            f"CLI: export VMFERRY_URL={where.url} "
            f"VMFERRY_TOKEN=$(cat {where.tokens[Role.OPERATOR]})",
            highlight=False,
        )
        out.file.flush()

    await run_service(config, listening)
    return EXIT_OK
