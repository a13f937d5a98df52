"""The lab image's kernel package is asked of apt once per state of apt's package lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.guest import image


@pytest.fixture
def lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "lists"
    directory.mkdir()
    (directory / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("a")
    monkeypatch.setattr(image, "APT_LISTS", directory)
    return directory


def test_apt_is_asked_again_only_when_its_lists_change(
    tmp_path: Path, lists: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([("linux-image-1-cloud-amd64", "1"), ("linux-image-2-cloud-amd64", "2")])
    asked: list[str] = []

    def resolve() -> tuple[str, str]:
        asked.append("apt-cache")
        return next(answers)

    monkeypatch.setattr(image, "_resolve_kernel_package", resolve)
    cache = tmp_path / "cache"
    assert image._kernel_package(cache) == ("linux-image-1-cloud-amd64", "1")
    assert image._kernel_package(cache) == ("linux-image-1-cloud-amd64", "1")
    assert asked == ["apt-cache"]
    # apt-get update rewrote a list: the answer may have changed.
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("bb")
    assert image._kernel_package(cache) == ("linux-image-2-cloud-amd64", "2")
    assert image._kernel_package(cache) == ("linux-image-2-cloud-amd64", "2")
    assert asked == ["apt-cache", "apt-cache"]


def test_unreadable_lists_or_a_broken_memo_ask_apt(
    tmp_path: Path, lists: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def resolve() -> tuple[str, str]:
        asked.append("apt-cache")
        return ("linux-image-1-cloud-amd64", "1")

    monkeypatch.setattr(image, "_resolve_kernel_package", resolve)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / image.KERNEL_MEMO).write_text("{not json")
    assert image._kernel_package(cache) == ("linux-image-1-cloud-amd64", "1")
    assert len(asked) == 1
    monkeypatch.setattr(image, "APT_LISTS", tmp_path / "missing")
    image._kernel_package(cache)
    image._kernel_package(cache)
    assert len(asked) == 3  # nothing to key a memo on: apt every time
