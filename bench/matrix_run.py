"""The matrix bench's moves: the CLI processes, one cell's VM, one record per strategy.

Everything goes through ``python -m vmferry.cli.main … --json`` with ``VMFERRY_LAB_DIR`` set to
the bench's own lab, so its history (``<lab>/history.db``, what ``migrate`` calibrates its
predictions from) starts empty. Held-out moves run against a frozen copy of the history taken
after the fit half: :class:`FrozenHistory` puts that copy back before each of them, so no
held-out move is ever fit on, not even an earlier held-out one. What the moves measured of
their own VM (the ``rewrites`` table: pages rewritten unchanged, ``vmferry.core.blind``) is
kept across the restore: it is a measurement of that VM, which a later move of the same VM
plans with as a user's would, not a calibration sample.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_cli import vmferry_json
from matrix_cells import Cell
from matrix_summary import derive

if TYPE_CHECKING:
    from vmferry.guest.debian import DebianImage

HOSTS = ("host-1", "host-2")
DEBIAN_VCPUS = 2
DEBIAN_READY_TIMEOUT_S = 240.0
WORKLOAD_UNIT = "vmferry-workload"


@dataclass(frozen=True, slots=True)
class CliOutcome:
    """One ``vmferry … --json`` process."""

    exit_code: int | None  # None: killed after the bench's own timeout
    wall_ms: int
    data: Any
    stderr_tail: str


@dataclass(frozen=True, slots=True)
class DebianBoot:
    """The cached Debian image's files (``vmferry.guest.debian.debian_image``)."""

    disk: Path
    kernel: Path
    initrd: Path
    append: str

    @classmethod
    def of(cls, image: DebianImage) -> DebianBoot:
        return cls(image.disk, image.kernel, image.initrd, image.root_append)


def cli(lab_dir: Path, *args: str, timeout_s: float = 300) -> CliOutcome:
    """Run ``python -m vmferry.cli.main ARGS --json`` against the lab in ``lab_dir``."""
    started = time.monotonic()
    try:
        result, wall = vmferry_json(lab_dir, *args, timeout_s=timeout_s)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        wall_ms = round((time.monotonic() - started) * 1000)
        return CliOutcome(None, wall_ms, None, f"bench timeout after {timeout_s:.0f} s; {stderr}")
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    return CliOutcome(result.returncode, round(wall), data, result.stderr.strip()[-600:])


class FrozenHistory:
    """The history as the fit half left it; held-out moves see only that."""

    def __init__(self, lab_dir: Path) -> None:
        self.live = lab_dir / "history.db"
        self.frozen = lab_dir / "history.fit.db"
        self.is_frozen = False

    def freeze(self) -> int:
        """Keep the fit half's history; return how many moves it holds."""
        if self.live.exists():
            shutil.copyfile(self.live, self.frozen)
        self.is_frozen = True
        return entries(self.frozen)

    def restore(self) -> None:
        """Before a held-out move: the fit half's history again, nothing held-out in it."""
        if not self.is_frozen:
            return
        measured = _rewrites(self.live)
        if self.frozen.exists():
            shutil.copyfile(self.frozen, self.live)
        else:
            self.live.unlink(missing_ok=True)
        if measured:
            with sqlite3.connect(self.live) as connection:
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS rewrites (vm TEXT NOT NULL, observed_at TEXT "
                    "NOT NULL, resent_zero_bps BIGINT NOT NULL, stalled INTEGER)"
                )
                connection.execute("DELETE FROM rewrites")
                connection.executemany(
                    "INSERT INTO rewrites (vm, observed_at, resent_zero_bps, stalled)"
                    " VALUES (?, ?, ?, ?)",
                    measured,
                )


def _rewrites(db: Path) -> list[tuple[object, ...]]:
    """The per-VM measurements in a history database (none before any move made them)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as connection:
        known = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'rewrites'"
        if not connection.execute(known).fetchone()[0]:
            return []
        return connection.execute(
            "SELECT vm, observed_at, resent_zero_bps, stalled FROM rewrites"
        ).fetchall()


def entries(db: Path) -> int:
    """Moves recorded in a history database (0 when there is none yet)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        # The controller's other tables (host marks, jobs) may be there before any move.
        known = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
        if connection.execute(known).fetchone() == (0,):
            return 0
        (count,) = connection.execute("SELECT count(*) FROM migrations").fetchone()
    return int(count)


def locate(lab_dir: Path, vm: str) -> str | None:
    shown = cli(lab_dir, "vm", "show", vm)
    if shown.exit_code == 0 and isinstance(shown.data, dict):
        return str(shown.data.get("host"))
    return None


def create(
    lab_dir: Path, vm: str, cell: Cell, debian: DebianBoot | None, settle_s: float
) -> CliOutcome:
    """Boot the cell's guest on host-1 and let its writer reach its rate."""
    if cell.guest == "lab":
        created = cli(
            lab_dir, "vm", "create", vm, "--host", HOSTS[0], "--memory", cell.memory,
            "--workload", cell.workload,
        )  # fmt: skip
    else:
        if debian is None:
            return CliOutcome(None, 0, None, "no Debian image")
        created = _create_debian(lab_dir, vm, cell, debian)
    if created.exit_code == 0:
        time.sleep(settle_s)  # let the guest fill its working set and reach its dirty rate
    return created


def _create_debian(lab_dir: Path, vm: str, cell: Cell, debian: DebianBoot) -> CliOutcome:
    return boot_debian(lab_dir, vm, cell.memory, cell.workload, debian)


def boot_debian(
    lab_dir: Path, vm: str, memory: str, workload: str, debian: DebianBoot
) -> CliOutcome:
    """The Debian guest on shared storage (only RAM moves, as for the lab guest), running the
    workload program from its kernel command line, its heartbeats on the lab channel."""
    from vmferry.core.workload import parse_workload

    append = " ".join([debian.append, *parse_workload(workload).kernel_args()])
    created = cli(
        lab_dir, "vm", "create", vm, "--host", HOSTS[0], "--memory", memory,
        "--vcpus", str(DEBIAN_VCPUS), "--image", str(debian.disk), "--storage", "shared",
        "--kernel", str(debian.kernel), "--initrd", str(debian.initrd), "--append", append,
        "--heartbeat",
    )  # fmt: skip
    if created.exit_code != 0:
        return created
    deadline = time.monotonic() + DEBIAN_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if _workload_active(lab_dir, vm):
            return CliOutcome(0, created.wall_ms, created.data, "")
        time.sleep(3.0)
    return CliOutcome(
        1, created.wall_ms, None, f"{WORKLOAD_UNIT} not active in {DEBIAN_READY_TIMEOUT_S:g} s"
    )


def _workload_active(lab_dir: Path, vm: str) -> bool:
    """``vm exec`` (no ``--json``: it would end up in the guest's command line)."""
    argv = [sys.executable, "-m", "vmferry.cli.main", "vm", "exec", vm, "--timeout", "10"]
    argv += ["--", "systemctl", "is-active", "--quiet", WORKLOAD_UNIT]
    env = {**os.environ, "VMFERRY_LAB_DIR": str(lab_dir)}
    try:
        done = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def make_record(
    cell: Cell, strategy: str, outcome: CliOutcome, refused: CliOutcome | None
) -> dict[str, Any]:
    """The result of one strategy on one cell, with its outcome and prediction errors."""
    report = outcome.data if isinstance(outcome.data, dict) and "status" in outcome.data else {}
    record: dict[str, Any] = {
        "strategy": strategy,
        "chosen": report.get("strategy"),
        "exit_code": outcome.exit_code,
        "status": report.get("status"),
        "error": report.get("error") if report else outcome.stderr_tail or None,
        "source": report.get("source"),
        "destination": report.get("destination"),
        "running_on": report.get("running_on"),
        "total_ms": report.get("total_ms"),
        "downtime_ms": report.get("downtime_ms"),
        "guest_downtime_ms": report.get("guest_downtime_ms"),
        # Where the longest stall was: during the copy, or at the switch.
        "guest_stall_copy_ms": report.get("guest_stall_copy_ms"),
        "guest_stall_switch_ms": report.get("guest_stall_switch_ms"),
        "transferred_bytes": report.get("transferred_bytes"),
        "iterations": report.get("iterations"),
        "predicted": report.get("predicted", report.get("prediction")),
        "integrity": report.get("integrity"),
        "guest_alive": report.get("guest_alive"),
        "wall_ms": outcome.wall_ms + (refused.wall_ms if refused else 0),
        "refused": None,
        "forced": refused is not None,
        "history_moves": None,
        "retried_from": report.get("retried_from"),
    }
    if refused is not None:
        record["refused"] = {"exit_code": refused.exit_code, "message": refused.stderr_tail}
    derive(record, cell.goal_ms, cell.deadline_s)
    return record


def run_strategy(
    lab_dir: Path,
    vm: str,
    here: str,
    cell: Cell,
    strategy: str,
    history: FrozenHistory,
    cap_mbps: int | None,
) -> dict[str, Any]:
    """Move ``vm`` from ``here`` to the other host with one strategy and the cell's goal."""
    there = HOSTS[1] if here == HOSTS[0] else HOSTS[0]
    argv = [
        "migrate", vm, "--to", there, "--strategy", strategy,
        "--max-downtime", str(cell.goal_ms), "--deadline", f"{cell.deadline_s:g}",
    ]  # fmt: skip
    if cap_mbps is not None:
        argv += ["--bandwidth", str(cap_mbps)]  # loopback labs: the cap stands in for the link
    timeout_s = cell.deadline_s + 600  # post-copy cannot be cancelled once switched over
    history.restore()
    moves = entries(history.live)
    outcome = cli(lab_dir, *argv, timeout_s=timeout_s)
    refused = None
    if strategy == "auto" and outcome.exit_code == 2:
        refused = outcome
        history.restore()
        outcome = cli(lab_dir, *argv, "--force", timeout_s=timeout_s)
    record = make_record(cell, strategy, outcome, refused)
    record["history_moves"] = moves
    record["source"] = record["source"] or here
    record["destination"] = record["destination"] or there
    return record


def _seconds(ms: int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}s"


def run_line(cell: Cell, record: dict[str, Any]) -> str:
    """One human line per run."""
    parts = [f"{cell.name:<52} {record['strategy']:<13} {record['outcome']:<11}"]
    if record["status"] is not None:
        parts.append(
            f"{record['status']:<9} total {_seconds(record['total_ms'])} "
            f"qemu {record['downtime_ms']} ms guest {record['guest_downtime_ms']} ms "
            f"moved {(record['transferred_bytes'] or 0) / 2**20:.0f} MiB"
        )
        if record["chosen"] != record["strategy"]:
            parts.append(f"chose {record['chosen']}{' (forced)' if record['forced'] else ''}")
        predicted = record["predicted"]
        if predicted:
            parts.append(
                f"pred {_seconds(predicted.get('total_ms'))}/{predicted.get('downtime_ms')} ms"
                f"/guest {predicted.get('guest_downtime_ms', '-')} ms"
            )
    if record["error"]:
        parts.append(f"error: {' '.join(str(record['error']).split())[:160]}")
    parts.append(f"wall {_seconds(record['wall_ms'])}")
    return "  ".join(parts)
