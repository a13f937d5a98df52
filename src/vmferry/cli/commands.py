"""Which module runs each command, imported only when that command runs.

A command pays at start-up for what it uses alone: ``plan`` does not load the migration
machinery, ``vm list`` not the predictor, neither of them the lab. Each command is an async
function ``(args, err, out) -> exit status``; human output and progress go to ``err``,
``--json`` output to ``out``.

With ``--server URL`` or ``$VMFERRY_URL`` set, the commands of :data:`REMOTE` talk to a
``vmferry serve`` instead (:mod:`vmferry.cli.remote`); the others run in-process as ever.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["COMMANDS", "REMOTE", "Command", "command_for", "run"]

Command = Callable[[argparse.Namespace, "Console", "Console"], Awaitable[int]]

# (command, action) -> "module:function"
COMMANDS: dict[tuple[str, str | None], str] = {
    ("lab", "up"): "vmferry.cli.lab:lab_up",
    ("lab", "status"): "vmferry.cli.lab:lab_status",
    ("lab", "down"): "vmferry.cli.lab:lab_down",
    ("lab", "restart"): "vmferry.cli.lab:lab_restart",
    ("lab", "link"): "vmferry.cli.lab:lab_link",
    ("image", "build"): "vmferry.cli.lab:image_build",
    ("vm", "create"): "vmferry.cli.guests:vm_create",
    ("vm", "import"): "vmferry.cli.guests:vm_import",
    ("vm", "exec"): "vmferry.cli.guests:vm_exec",
    ("vm", "list"): "vmferry.cli.vms:vm_list",
    ("vm", "show"): "vmferry.cli.vms:vm_show",
    ("vm", "delete"): "vmferry.cli.vms:vm_delete",
    ("verify", None): "vmferry.cli.vms:verify",
    ("history", None): "vmferry.cli.vms:history",
    ("plan", None): "vmferry.cli.plan:plan",
    ("migrate", None): "vmferry.cli.moves:migrate",
    ("demo", None): "vmferry.cli.moves:demo",
    ("reconcile", None): "vmferry.cli.moves:reconcile",
    ("agent", None): "vmferry.cli.agent:agent",
    ("simulate", None): "vmferry.cli.simulate:run_simulate",
    ("host", "list"): "vmferry.cli.hosts:host_list",
    ("host", "maintenance"): "vmferry.cli.hosts:host_maintenance",
    ("host", "evacuate"): "vmferry.cli.hosts:host_evacuate",
    ("job", "list"): "vmferry.cli.jobs:job_list",
    ("job", "show"): "vmferry.cli.jobs:job_show",
    ("job", "resume"): "vmferry.cli.jobs:job_resume",
    ("balance", None): "vmferry.cli.balance:balance",
    ("serve", None): "vmferry.cli.serve:serve",
}

# The commands that go through the service in client mode.
REMOTE: dict[tuple[str, str | None], str] = {
    ("vm", "list"): "vmferry.cli.remote:vm_list",
    ("host", "list"): "vmferry.cli.remote:host_list",
    ("history", None): "vmferry.cli.remote:history",
    ("migrate", None): "vmferry.cli.remote:migrate",
    ("host", "evacuate"): "vmferry.cli.remote:host_evacuate",
    ("balance", None): "vmferry.cli.remote:balance",
    ("reconcile", None): "vmferry.cli.remote:reconcile",
    ("vm", "show"): "vmferry.cli.remote:vm_show",
    ("vm", "create"): "vmferry.cli.remote:vm_create",
    ("vm", "delete"): "vmferry.cli.remote:vm_delete",
    ("verify", None): "vmferry.cli.remote:verify",
    ("plan", None): "vmferry.cli.remote:plan",
    ("host", "maintenance"): "vmferry.cli.remote:host_maintenance",
    ("job", "list"): "vmferry.cli.remote:job_list",
    ("job", "show"): "vmferry.cli.remote:job_show",
    ("job", "resume"): "vmferry.cli.remote:job_resume",
}


def command_for(command: str, action: str | None, *, remote: bool = False) -> Command:
    """The function that runs ``command`` (``action``), its module imported now (``remote``:
    its client mode, for the commands that have one)."""
    table = REMOTE if remote and (command, action) in REMOTE else COMMANDS
    module, _, name = table[(command, action)].partition(":")
    function: Command = getattr(importlib.import_module(module), name)
    return function


async def run(args: argparse.Namespace, err: Console, out: Console) -> int:
    """Run the command ``args`` names."""
    action = getattr(args, f"{args.command}_command", None)
    remote = bool(getattr(args, "server", None) or os.environ.get("VMFERRY_URL"))
    return await command_for(args.command, action, remote=remote)(args, err, out)
