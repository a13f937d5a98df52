"""The ``vmferry`` command: parse arguments, dispatch, map errors to exit statuses.

Start-up is part of every command's latency (``plan`` is meant to answer in a fraction of a
second as a whole process), so this module imports little: the command's own module is
imported once the arguments are parsed (:mod:`vmferry.cli.commands`), and Rich once there is
something to print.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

from vmferry.cli import commands
from vmferry.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from vmferry.cli.parser import build_parser
from vmferry.core.errors import ConfigError, FerryError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

__all__ = ["entry", "main"]

# Columns of output that goes to a pipe or a log (no terminal to fit).
_LOG_WIDTH = 160


def _configure_logging(verbosity: int, command: str) -> None:
    # An agent and the controller service log their operations by default.
    extra = 1 if command in ("agent", "serve") else 0
    level = logging.WARNING - 10 * min(verbosity + extra, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _consoles(stdout: TextIO | None, stderr: TextIO | None) -> tuple[Console, Console]:
    """``err`` and ``out``: as Rich makes them on a terminal; in a pipe or a log, wide (Rich
    would lay tables out in 80 columns there) unless ``COLUMNS`` says otherwise."""
    from rich.console import Console  # not at import: --help, --version, usage errors print none

    def fit(console: Console) -> Console:
        if console.is_terminal or "COLUMNS" in os.environ:
            return console
        return Console(
            file=console.file, stderr=console.stderr, soft_wrap=console.soft_wrap, width=_LOG_WIDTH
        )

    err = Console(file=stderr, stderr=stderr is None)
    out = Console(file=stdout, soft_wrap=True)
    return fit(err), fit(out)


def _error_line(error: FerryError) -> Text:
    from rich.text import Text

    return Text.assemble(("error: ", "bold red"), str(error))


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; for ``vm exec`` everything after ``--`` is the guest's command, options
    included (argparse alone would take them for vmferry's)."""
    before, tail = argv, None
    if "--" in argv:
        at = argv.index("--")
        if argv[:at].count("vm") and "exec" in argv[:at]:
            before, tail = argv[:at], argv[at + 1 :]
    args = build_parser(before).parse_args(before)
    if tail is not None:
        args.argv = [*args.argv, *tail]
    return args


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Entry point of the ``vmferry`` console script; returns the exit status.

    Args:
        argv: the arguments (default: the process's).
        stdout, stderr: where the command's output and messages go (default: the process's;
            tests run commands in-process with their own). Usage errors go to ``sys.stderr``.
    """
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    _configure_logging(args.verbose, args.command)
    err, out = _consoles(stdout, stderr)
    try:
        return asyncio.run(commands.run(args, err, out))
    except FerryError as error:
        err.print(_error_line(error), highlight=False)
        return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED


def entry() -> NoReturn:
    """The console script: :func:`main`, then exit without tearing the interpreter down.

    Freeing every module and object at exit takes 20-40 ms that nothing needs (the command
    is done, its files closed); logs and output are flushed first.
    """
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
