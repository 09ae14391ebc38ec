"""The rooms' boundaries: the core loads nothing of Ray, gRPC, protobuf or torch, and no room reaches
into a room above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_CORE = ("ray", "grpc", "google.protobuf", "torch")
# What each room may import of attnserve: the core stands alone; models and export stand on it.
ALLOWED = {
    "core": ("attnserve.core",),
    "models": ("attnserve.core", "attnserve.models"),
    "export": ("attnserve.core", "attnserve.models", "attnserve.export"),
}


def test_importing_every_core_module_loads_no_ray_grpc_protobuf_or_torch():
    code = (
        "import sys, pkgutil, importlib, attnserve.core as c\n"
        "names = [m.name for m in pkgutil.walk_packages(c.__path__, 'attnserve.core.')]\n"
        "assert len(names) >= 10, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IN_CORE!r}\n"
        "             or m.startswith('google.protobuf'))\n"
        "assert not bad, bad[:10]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _attnserve_imports(path: Path) -> set[str]:
    """The attnserve modules a source file imports (at any depth: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("attnserve")}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_a_room_imports_only_itself_and_the_rooms_below(room):
    files = sorted((ROOT / room).rglob("*.py"))
    assert files
    stray = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in _attnserve_imports(path)
        if not name.startswith(ALLOWED[room])
    }
    assert not stray, sorted(stray)
