"""``vmferry agent``: run one host's agent (``lab up`` starts them; so can a service manager).

Its log goes to stderr (the CLI configures logging at INFO for it).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vmferry.agent.host import AgentConfig
from vmferry.agent.qemu_user import resolve_qemu_user
from vmferry.agent.server import run_agent
from vmferry.agent.tls import server_context
from vmferry.cli.exits import EXIT_OK
from vmferry.core.errors import ConfigError
from vmferry.core.model import validate_name
from vmferry.core.workload import parse_size
from vmferry.qemu.tls import check_creds_dir

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["agent"]


async def agent(args: argparse.Namespace, err: Console, out: Console) -> int:
    """``agent --host H --state-dir D --token-file F``: serve until stopped."""
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen must be ADDR:PORT, got {args.listen!r}")
    try:
        token = args.token_file.read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read the token file: {error}") from error
    if len(token) < 16:
        raise ConfigError("the token must be at least 16 characters")
    if args.insecure_http:
        if args.tls_cert or args.tls_key:
            raise ConfigError("--insecure-http and --tls-cert/--tls-key exclude each other")
        tls = None
    elif args.tls_cert and args.tls_key:
        tls = server_context(args.tls_cert, args.tls_key)
    else:
        raise ConfigError(
            "the agent serves HTTPS: give --tls-cert and --tls-key (or --insecure-http)"
        )
    config = AgentConfig(
        host=validate_name(args.host, "host name"),
        state_dir=args.state_dir,
        memory_bytes=parse_size(args.memory),
        migration_address=args.migration_address,
        shared_dir=args.shared_dir,
        disk_bytes=None if args.disk is None else parse_size(args.disk),
        qemu_tls_dir=None if args.qemu_tls_dir is None else check_creds_dir(args.qemu_tls_dir),
        qemu_user=resolve_qemu_user(args.qemu_user),
        profile_interval_s=args.profile_interval if args.profile_interval > 0 else None,
    )
    await run_agent(config, host, int(port), token, args.ready_file, tls)
    return EXIT_OK
