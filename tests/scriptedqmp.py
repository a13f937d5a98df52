"""A QMP session whose answers a unit test scripts (a stand-in for QEMU where only the
commands' order and arguments matter); the real QEMU runs in the integration tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.qemu.session import QmpSession


class ScriptedQmp(QmpSession):
    """Records every command and answers it with :meth:`answer`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.commands: list[str] = []

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float = 5.0,
        oob: bool = False,
    ) -> Any:
        self.commands.append(command)
        return await self.answer(command, dict(arguments or {}), timeout_s)

    async def answer(self, command: str, arguments: dict[str, object], timeout_s: float) -> Any:
        """QEMU's ``return`` value for ``command``."""
        raise NotImplementedError(command)
