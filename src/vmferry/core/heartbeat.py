"""Guest-observed downtime from heartbeats: the largest gap between arrivals inside a window.

The guest sends numbered heartbeats at a fixed rate. While the guest is paused (switchover) none
arrive, so the largest gap between consecutive arrivals during a migration is the downtime the
guest actually experienced, as seen from outside. Times are injected (milliseconds from any
monotonic clock), so this stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HeartbeatGaps"]


@dataclass(slots=True)
class HeartbeatGaps:
    """Tracks heartbeat arrivals; reports the largest gap inside the open window."""

    last_seq: int = 0
    last_arrival_ms: float | None = None
    received: int = 0
    dropped: int = 0
    window_open: bool = False
    window_max_gap_ms: float = 0.0
    window_start_ms: float | None = None
    dirtied_pages: int = 0
    first_arrival_ms: float | None = None

    def observe(self, seq: int, arrival_ms: float, dirtied_pages: int = 0) -> None:
        """Record heartbeat ``seq`` arriving at ``arrival_ms``.

        ``dirtied_pages`` is the guest's running count of pages it has rewritten.

        Heartbeats from the guest's previous home that arrive late (seq not newer) are ignored,
        as are sequence numbers that go backwards (a rebooted guest starts again at 1: that
        restarts counting).
        """
        if seq <= self.last_seq and seq != 1:
            return
        if seq > self.last_seq + 1 and self.last_seq:
            self.dropped += seq - self.last_seq - 1
        if self.window_open:
            reference = self.last_arrival_ms
            if reference is None or (
                self.window_start_ms is not None and reference < self.window_start_ms
            ):
                reference = self.window_start_ms
            if reference is not None:
                self.window_max_gap_ms = max(self.window_max_gap_ms, arrival_ms - reference)
        self.last_seq = seq
        if self.first_arrival_ms is None:
            self.first_arrival_ms = arrival_ms
        self.last_arrival_ms = arrival_ms
        self.dirtied_pages = dirtied_pages
        self.received += 1

    def open_window(self, now_ms: float) -> None:
        """Start measuring (e.g. when the migration starts)."""
        self.window_open = True
        self.window_start_ms = now_ms
        self.window_max_gap_ms = 0.0

    def close_window(self) -> int:
        """Stop measuring; return the largest gap seen, in whole milliseconds."""
        self.window_open = False
        return round(self.window_max_gap_ms)

    def silence_ms(self, now_ms: float) -> float | None:
        """Time since the last heartbeat, None if none arrived yet."""
        return None if self.last_arrival_ms is None else now_ms - self.last_arrival_ms
