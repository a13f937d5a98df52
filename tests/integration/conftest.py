"""Fixtures that boot real QEMU guests. Every QEMU a test starts is ended by its fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from labcli import lab_dir

from vmferry.lab.local import LocalLab

__all__ = ["lab_dir"]  # the CLI tests' lab fixture, registered here for every module


@pytest_asyncio.fixture
async def lab() -> AsyncIterator[LocalLab]:
    """A fresh one-machine lab (own run directory under /tmp; short socket paths)."""
    opened = await LocalLab.open()
    try:
        yield opened
    finally:
        await opened.close()
