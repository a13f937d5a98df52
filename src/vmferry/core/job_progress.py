"""One ETA for a whole job of moves while it runs: its plan, corrected by what the moves did.

A move that ended ended when it did; a running move ends when its own progress says (its
ETA), or, before it has one, its predicted duration after it started; a move still waiting
starts no earlier than now and ends its predicted duration later, and no earlier than the
plan put it plus the lateness of the moves so far (what delays the moves before it delays
the ones that take over their links).

Example:
    >>> planned = {"a": (0.0, 10.0), "b": (10.0, 20.0)}
    >>> job_remaining_s(planned, 12.0, ended={"a": 12.0}, running={})
    10.0
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["job_remaining_s"]


def job_remaining_s(
    planned: Mapping[str, tuple[float, float]],
    now_s: float,
    *,
    ended: Mapping[str, float],
    running: Mapping[str, tuple[float, float | None]],
) -> float:
    """Seconds until the job's last move is expected to end.

    Args:
        planned: each move's predicted (start, end), from the job's start.
        now_s: now, from the job's start.
        ended: each ended move's end.
        running: each running move's (start, its own remaining seconds if it has an ETA).

    Returns:
        0 once every move ended.
    """
    expected: dict[str, float] = {}
    late_s = 0.0
    for vm, end_s in ended.items():
        expected[vm] = end_s
        if vm in planned:
            late_s = max(late_s, end_s - planned[vm][1])
    for vm, (start_s, eta_s) in running.items():
        p_start, p_end = planned.get(vm, (start_s, start_s))
        own_s = now_s + eta_s if eta_s is not None else None
        end_s = own_s if own_s is not None else max(now_s, start_s + (p_end - p_start))
        expected[vm] = end_s
        late_s = max(late_s, end_s - p_end)
    for vm, (p_start, p_end) in planned.items():
        if vm in expected:
            continue
        expected[vm] = max(p_end + late_s, now_s + (p_end - p_start))
    return max(0.0, max(expected.values(), default=now_s) - now_s)
