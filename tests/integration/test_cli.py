"""The vmferry command line, end to end."""

from __future__ import annotations

import json
import subprocess

import pytest
from clirunner import vmferry


def _vmferry(*args: str) -> subprocess.CompletedProcess[str]:
    return vmferry(args)  # in this process: the command line's real entry point


@pytest.mark.qemu
def test_demo_json_report() -> None:
    result = _vmferry("demo", "--memory", "512M", "--workload", "idle", "--json")
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["destination"] for r in reports] == ["host-2", "host-1"]
    for report in reports:
        assert report["schema"] == 1
        assert report["status"] == "completed"
        assert report["integrity"]["ok"] is True
        assert report["integrity"]["blocks_checked"] == (64 << 20) // 4096  # its disk moved too
        assert report["guest_alive"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--memory", "10T"], "memory"),
        (["demo", "--memory", "lots"], "bad size"),
        (["demo", "--workload", "dirty:rate=fast"], "bad size"),
        (["demo", "--workload", "bogus"], "workload"),
        (["demo", "--max-downtime", "0"], "max-downtime"),
        (["demo", "--disk", "1K"], "disk size"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(args: list[str], message: str) -> None:
    result = _vmferry(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.lower()
    assert "Traceback" not in result.stderr
