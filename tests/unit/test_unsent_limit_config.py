"""The agent's unsent-bytes limit: default, another size, none, a typo."""

from __future__ import annotations

import pytest

from vmferry.core.errors import ConfigError
from vmferry.core.felt import NOTSENT_LOWAT_BYTES
from vmferry.qemu.sockets import unsent_limit_bytes, uri_host


def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFERRY_UNSENT_LIMIT_BYTES", raising=False)
    assert unsent_limit_bytes() == NOTSENT_LOWAT_BYTES
    monkeypatch.setenv("VMFERRY_UNSENT_LIMIT_BYTES", "32768")
    assert unsent_limit_bytes() == 32768
    monkeypatch.setenv("VMFERRY_UNSENT_LIMIT_BYTES", "0")
    assert unsent_limit_bytes() is None
    monkeypatch.setenv("VMFERRY_UNSENT_LIMIT_BYTES", "128k")
    with pytest.raises(ConfigError, match="number of bytes"):
        unsent_limit_bytes()


def test_uri_host() -> None:
    assert uri_host("tcp:10.211.77.2:4444") == "10.211.77.2"
    assert uri_host("tcp:[::1]:4444") == "::1"
