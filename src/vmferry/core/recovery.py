"""Post-copy recovery decisions (pure): when a post-copy is broken, and how long to wait
between recovery attempts.

During post-copy the destination runs the guest and pulls the pages it lacks from the source.
A network fault there either makes QEMU pause the migration itself (``postcopy-paused``, once a
socket errors) or, when packets are silently dropped, stalls it until TCP gives up minutes
later. :func:`is_stalled` spots the second case from progress samples so the controller can
pause it at once (``migrate-pause``); :class:`RecoveryPolicy` spaces the ``migrate-recover`` /
``migrate resume`` attempts that follow until one succeeds or the limit passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.core.errors import ConfigError
from vmferry.core.status import MigrationStatus

__all__ = ["RecoveryPolicy", "is_stalled"]

# Which statuses mean post-copy (the destination owns the guest) or a broken post-copy are
# properties of :class:`MigrationStatus` (``is_postcopy``, ``is_postcopy_broken``).


def is_stalled(
    status: MigrationStatus, last_progress_s: float, now_s: float, stall_s: float
) -> bool:
    """Whether an active post-copy has sent nothing for ``stall_s`` seconds.

    A healthy post-copy sends continuously (the background copy plus faulted pages) until it
    completes, so a stream that stopped moving has lost its link.

    Args:
        status: QEMU's current migration status on the source.
        last_progress_s: when the transferred byte count last grew (any monotonic clock).
        now_s: now, on the same clock.
        stall_s: how long without progress counts as broken.
    """
    return status is MigrationStatus.POSTCOPY_ACTIVE and now_s - last_progress_s >= stall_s


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """How recovery attempts are spaced: exponential backoff, capped, within ``limit_s``.

    Attributes:
        limit_s: give up when no attempt succeeded this long after the post-copy broke.
        first_delay_s: wait after the first failed attempt.
        factor: each further wait is this much longer ...
        max_delay_s: ... up to this.
    """

    limit_s: float = 600.0
    first_delay_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.limit_s <= 86_400:
            raise ConfigError("--recovery-limit must be in (0, 86400] seconds")
        if self.first_delay_s <= 0 or self.factor < 1 or self.max_delay_s < self.first_delay_s:
            raise ConfigError("recovery backoff needs 0 < first delay <= max delay, factor >= 1")

    def delay_s(self, failed_attempts: int) -> float:
        """The wait after ``failed_attempts`` (>= 1) failed attempts in a row."""
        exponent = max(0, failed_attempts - 1)
        # Cap the exponent first: factor ** a large number overflows a float.
        if self.factor > 1 and exponent > 64:
            return self.max_delay_s
        return min(self.max_delay_s, self.first_delay_s * self.factor**exponent)

    def next_wait_s(self, failed_attempts: int, elapsed_s: float) -> float | None:
        """How long to wait before the next attempt, or None when the limit has passed
        (``elapsed_s`` since the post-copy broke). The last wait is cut to end at the limit,
        so one final attempt runs right at it."""
        remaining = self.limit_s - elapsed_s
        if remaining <= 0:
            return None
        return min(self.delay_s(failed_attempts), remaining)
