"""The progress line in a pipe or a log: whole lines ending with a newline, one per phase
change and at most one every few seconds in between, the last state at the end; and reports
laid out wide instead of squeezed into 80 columns; JSON as Rich would print it there."""

from __future__ import annotations

import io
import json

from rich.console import Console

from vmferry.cli.progress import ProgressLine
from vmferry.cli.render import print_json
from vmferry.core.model import MigrationStats
from vmferry.core.phases import Phase
from vmferry.core.status import MigrationStatus


def _stats(sent: int) -> MigrationStats:
    return MigrationStats(
        status=MigrationStatus.ACTIVE,
        total_ms=sent,
        transferred_bytes=sent << 20,
        remaining_bytes=0,
        total_bytes=1 << 30,
        dirty_pages_rate=0,
        page_size=4096,
        iterations=1,
        throughput_bps=0,
        expected_downtime_ms=None,
        downtime_ms=None,
    )


def test_a_log_gets_whole_lines_on_phase_changes_and_every_few_seconds() -> None:
    log = io.StringIO()
    now = [0.0]
    with ProgressLine(Console(file=log, width=160), "vm1 → host-2", clock=lambda: now[0]) as line:
        line.update(Phase.PREPARING, None)
        line.update(Phase.ACTIVE, _stats(1))  # a new phase: printed
        for second in (1.0, 2.0, 3.0):  # same phase, within 5 s: held back
            now[0] = second
            line.update(Phase.ACTIVE, _stats(int(second) + 1))
        now[0] = 6.0
        line.update(Phase.ACTIVE, _stats(7))  # 5 s since the last line: printed
        now[0] = 7.0
        line.update(Phase.ACTIVE, _stats(8))  # held back, then printed at the end
    lines = log.getvalue().splitlines()
    assert log.getvalue().endswith("\n")
    assert [x.split(" sent")[0].rsplit(" ", 2)[-2:] for x in lines[1:]] == [
        ["1.0", "MiB"],
        ["7.0", "MiB"],
        ["8.0", "MiB"],
    ]
    assert lines[0] == "vm1 → host-2 preparing"
    assert all(x.startswith("vm1 → host-2 active ") for x in lines[1:])


def test_json_in_a_pipe_is_the_text_rich_prints() -> None:
    data = {
        "vm": "vm1",
        "move": "host-1 → host-2 ◀",
        "nested": {"ratio": 1.0 / 3, "none": None, "ok": True, "list": (1, 2.5e-7, "x")},
        "long": "word " * 60,
        "escapes": 'tab\there "quoted" \\ back\nline',
        "empty": {},
        "nothing": [],
    }
    ours, rich = io.StringIO(), io.StringIO()
    print_json(Console(file=ours, soft_wrap=True, width=160), data)
    Console(file=rich, soft_wrap=True, width=160).print_json(json.dumps(data))
    assert ours.getvalue() == rich.getvalue()
