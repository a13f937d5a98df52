"""The CLI's lazy dispatch: every command the parser knows runs a function of the table, and
``plan`` starts without the modules it does not use (its start-up is most of its latency)."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

from vmferry.cli.commands import COMMANDS, command_for
from vmferry.cli.parser import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_of_the_parser_has_a_function() -> None:
    parsed: set[tuple[str, str | None]] = set()
    for name, sub in _subcommands(build_parser()).items():
        actions = _subcommands(sub)
        parsed |= {(name, action) for action in actions} if actions else {(name, None)}
    assert parsed == set(COMMANDS)
    for command, action in COMMANDS:
        assert inspect.iscoroutinefunction(command_for(command, action)), (command, action)


def test_plan_imports_no_migration_machinery_and_no_lab() -> None:
    code = (
        "import sys\n"
        "from vmferry.cli.commands import command_for\n"
        "import vmferry.cli.main\n"
        "command_for('plan', None)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "vmferry.controller.plan" in loaded
    unwanted = {
        "aiohttp",
        "platformdirs",
        "vmferry.cli.progress",
        "vmferry.controller.migrate",
        "vmferry.core.migration",
        "vmferry.guest.image",
        "vmferry.lab.cluster",
    }
    assert not unwanted & loaded


def test_client_mode_has_a_function_for_each_remote_command() -> None:
    from vmferry.cli.commands import REMOTE

    assert set(REMOTE) <= set(COMMANDS)
    for command, action in REMOTE:
        remote = command_for(command, action, remote=True)
        assert inspect.iscoroutinefunction(remote), (command, action)
        assert remote.__module__ == "vmferry.cli.remote"
    # Commands without a client mode run in-process either way.
    assert command_for("vm", "import", remote=True).__module__ == "vmferry.cli.guests"


def test_server_option_before_the_command() -> None:
    for argv in (
        ["--server", "https://h:7780", "migrate", "a", "--to", "b"],
        ["--server=https://h:7780", "migrate", "a", "--to", "b"],
    ):
        args = build_parser(argv).parse_args(argv)
        assert (args.server, args.command, args.name, args.to) == (
            "https://h:7780",
            "migrate",
            "a",
            "b",
        )
    assert build_parser(["serve"]).parse_args(["serve"]).listen == "127.0.0.1:7780"


def test_plan_does_not_load_the_service() -> None:
    code = (
        "import sys\n"
        "from vmferry.cli.commands import command_for\n"
        "import vmferry.cli.main\n"
        "command_for('plan', None)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {m for m in done.stdout.split() if m.startswith("vmferry.service")}
