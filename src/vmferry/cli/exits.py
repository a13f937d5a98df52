"""Exit statuses of ``vmferry`` that scripts can rely on."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1  # it ran and failed (migration failed, guest not verified intact, agent down)
EXIT_USAGE = 2  # bad input or refused by a pre-check: nothing was changed
EXIT_INTERRUPTED = 130
