"""Fixtures that boot real QEMU guests. Every QEMU a test starts is ended by its fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from vmferry.lab.local import LocalLab


@pytest_asyncio.fixture
async def lab() -> AsyncIterator[LocalLab]:
    """A fresh one-machine lab (own run directory under /tmp; short socket paths)."""
    opened = await LocalLab.open()
    try:
        yield opened
    finally:
        await opened.close()
