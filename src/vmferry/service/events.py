"""Live events: one bus, a bounded queue per watcher, Server-Sent Events on the wire.

Publishing never waits: each watcher has its own queue of at most ``max_queue`` events, and a
watcher that does not keep up loses its oldest events (drop-oldest), counted, and is told how
many with a ``dropped`` event before the next one it gets. A slow client thus costs the server
a bounded amount of memory and no time; the progress line it draws only skips samples.

Event kinds (``data`` is JSON):

- ``hello``: sent first on every stream (``{"seq"}``), once the watcher is subscribed;
- ``job``: a job was created or changed state (the record of ``GET /jobs/{id}`` without its
  ``result``, which may be large, and with ``has_result``);
- ``plan``: a move's pre-flight measured its guest (``{"job", "vm", "zero_fraction",
  "dirty_rate_bps", "dirty_set_bytes"}``: what the ETA learns the guest from);
- ``progress``: a move's phase and its latest sample (``{"job", "vm", "phase", "eta_ms",
  "stats"}``, ``stats`` as the agent API sends them, or null; ``eta_ms`` the time left as the
  CLI's estimator makes it, or null): what the CLI's progress line shows;
- ``dropped``: ``{"count"}`` events this watcher lost since its last ``dropped``.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventBus", "Watcher", "sse_comment", "sse_frame"]


@dataclass(frozen=True, slots=True)
class Event:
    """One published event; ``seq`` grows by one per event on the bus."""

    seq: int
    kind: str
    data: Mapping[str, Any]

    @property
    def job(self) -> int | None:
        job = self.data.get("job", self.data.get("id") if self.kind == "job" else None)
        return job if isinstance(job, int) else None


def sse_frame(event: Event) -> bytes:
    """``event`` as one Server-Sent Events frame."""
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A comment frame (ignored by clients; keeps idle connections and proxies alive)."""
    return f": {text}\n\n".encode()


@dataclass(slots=True)
class Watcher:
    """One subscriber: its queue, what it wants, what it lost."""

    max_queue: int
    job: int | None = None
    queue: deque[Event] = field(default_factory=deque)
    dropped: int = 0  # lost since the last ``dropped`` event it was given
    dropped_total: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, event: Event) -> bool:
        return self.job is None or event.job == self.job

    def offer(self, event: Event) -> bool:
        """Queue ``event`` (dropping the oldest when full); True if one was dropped."""
        lost = len(self.queue) >= self.max_queue
        if lost:
            self.queue.popleft()
            self.dropped += 1
            self.dropped_total += 1
        self.queue.append(event)
        self.wake.set()
        return lost

    def take(self) -> list[Event]:
        """Everything queued (a ``dropped`` notice first, if events were lost)."""
        taken = list(self.queue)
        self.queue.clear()
        self.wake.clear()
        if self.dropped:
            seq = taken[0].seq if taken else 0
            taken.insert(0, Event(seq, "dropped", {"count": self.dropped}))
            self.dropped = 0
        return taken

    async def next(self, timeout_s: float) -> list[Event]:
        """What arrived, waiting up to ``timeout_s`` for something (empty: nothing came)."""
        if not self.queue:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.wake.wait()
            except TimeoutError:
                return []
        return self.take()


class EventBus:
    """Fan-out of events to every watcher (see the module docstring)."""

    def __init__(self, max_queue: int = 256) -> None:
        self.max_queue = max_queue
        self.seq = 0
        self.dropped_total = 0
        self._watchers: list[Watcher] = []

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def publish(self, kind: str, data: Mapping[str, Any]) -> Event:
        """Give every interested watcher the event (never waits)."""
        self.seq += 1
        event = Event(self.seq, kind, data)
        for watcher in self._watchers:
            if watcher.wants(event) and watcher.offer(event):
                self.dropped_total += 1
        return event

    def wake_all(self) -> None:
        """Wake every watcher now (the service is stopping: streams end without waiting for
        their next keepalive)."""
        for watcher in self._watchers:
            watcher.wake.set()

    @contextmanager
    def watch(self, job: int | None = None) -> Iterator[Watcher]:
        """Subscribe for the ``with`` block (only ``job``'s events, if given)."""
        watcher = Watcher(self.max_queue, job)
        self._watchers.append(watcher)
        try:
            yield watcher
        finally:
            self._watchers.remove(watcher)
