"""Import direction: core imports only core; qemu and guest never import lab/cli; only qemu/
imports qemu.qmp; nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vmferry"

# layer -> vmferry layers it may import
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "qemu": {"core", "qemu"},
    "guest": {"core", "guest"},
    "agent": {"core", "qemu", "guest", "agent"},
    "controller": {"core", "controller", "agent"},
    "service": {"core", "agent", "controller", "service"},
    "lab": {"core", "qemu", "guest", "agent", "controller", "lab"},
    "cli": {"core", "guest", "qemu", "agent", "controller", "service", "lab", "cli"},
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


MODULES = sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_import_direction(path: Path) -> None:
    layer = path.relative_to(SRC).parts[0]
    assert layer in ALLOWED, f"unknown layer {layer}"
    for name in _imports(path):
        if name == "qemu.qmp" or name.startswith("qemu.qmp."):
            assert layer == "qemu", f"{path.name} imports qemu.qmp outside vmferry/qemu"
        if name.startswith("vmferry."):
            target = name.split(".")[1]
            assert target in ALLOWED[layer], f"{layer}/{path.name} imports vmferry.{target}"
        if layer == "core":
            banned = {"asyncio", "socket", "subprocess", "sqlite3", "time", "os", "shutil"}
            assert name.split(".")[0] not in banned, f"core/{path.name} does I/O via {name}"


def test_every_module_has_a_docstring() -> None:
    for path in SRC.rglob("*.py"):
        if path.name == "__init__.py" and not path.read_text().strip():
            continue
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} lacks a docstring"


def test_no_shell_strings() -> None:
    """Processes are started from argv lists only: no shell ever parses a string we built."""
    banned = {"create_subprocess_shell", "system", "popen"}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                assert name not in banned, f"{path.name}:{node.lineno} calls {name}"
                for keyword in node.keywords:
                    assert not (
                        keyword.arg == "shell"
                        and isinstance(keyword.value, ast.Constant)
                        and keyword.value.value
                    ), f"{path.name}:{node.lineno} uses shell=True"
