"""The live progress line of a move: phase, transferred, remaining, dirty rate, ETA (Rich)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.live import Live
from rich.text import Text

from vmferry.cli.render import format_bytes
from vmferry.core.eta import EtaEstimator, EtaHints
from vmferry.core.status import Stage

if TYPE_CHECKING:
    from rich.console import Console

    from vmferry.core.model import MigrationStats
    from vmferry.core.phases import Phase

__all__ = ["ProgressLine"]


class ProgressLine:
    """One status line per migration: phase, transferred, remaining, dirty rate, ETA.

    On a terminal the line is live (redrawn in place). In a pipe or a log it is printed as
    whole lines ending with a newline: at every change of phase, at most every ``every_s``
    in between, and the last state at the end. The ETA is :class:`EtaEstimator`'s, fed every
    sample (``hints``: what a measurement of the guest knows, if any).
    """

    def __init__(
        self,
        console: Console,
        title: str,
        *,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        hints: EtaHints | None = None,
    ) -> None:
        self.console = console
        self._eta = EtaEstimator(hints)
        self.title = title
        self._live = (
            Live(Text(f"{title}: preparing"), console=console, transient=False)
            if console.is_terminal
            else None
        )
        self._every_s, self._clock = every_s, clock
        self._shown: tuple[Phase, float] | None = None
        self._unshown: Text | None = None

    def hint(self, hints: EtaHints) -> None:
        """What a measurement of the guest knows, learnt before its first sample."""
        self._eta = EtaEstimator(hints)

    def __enter__(self) -> ProgressLine:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
        elif self._unshown is not None:
            self.console.print(self._unshown)

    def update(self, phase: Phase, stats: MigrationStats | None) -> None:
        if stats is not None:
            self._eta.add(stats)
        line = self._line(phase, stats)
        if self._live is not None:
            self._live.update(line)
            return
        now = self._clock()
        if (
            self._shown is None
            or self._shown[0] is not phase
            or now - self._shown[1] >= self._every_s
        ):
            self.console.print(line)
            self._shown, self._unshown = (phase, now), None
        else:
            self._unshown = line

    def _line(self, phase: Phase, stats: MigrationStats | None) -> Text:
        line = Text(f"{self.title} ", style="bold")
        line.append(phase.value, style="cyan")
        if stats is not None and stats.status.is_postcopy_broken:
            line.append(f" {stats.status}: recovering", style="bold yellow")
        if stats is not None and stats.stage is Stage.DISK_COPY:
            eta = self._eta.eta_ms()
            line.append(
                f" disk {format_bytes(stats.disk_copied_bytes)}"
                f" of {format_bytes(stats.disk_total_bytes)}"
                f", {format_bytes(stats.throughput_bps)}/s, then RAM"
                f", {stats.total_ms / 1000:.1f} s"
                + (f", ETA {eta / 1000:.1f} s" if eta is not None else "")
            )
        elif stats is not None:
            eta = self._eta.eta_ms()
            if stats.disk_total_bytes:
                line.append(f" disk {format_bytes(stats.disk_copied_bytes)} in sync,")
            line.append(
                f" {format_bytes(stats.transferred_bytes)} sent"
                f", {format_bytes(stats.remaining_bytes)} left"
                f", {format_bytes(stats.throughput_bps)}/s"
                f", dirty {format_bytes(stats.dirty_rate_bps)}/s"
                f", pass {stats.iterations}"
                f", {stats.total_ms / 1000:.1f} s"
                + (f", ETA {eta / 1000:.1f} s" if eta is not None else "")
            )
        return line
