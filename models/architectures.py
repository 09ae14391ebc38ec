"""Model families by name; each family's graph tables and wiring sit beside its model (`ARCHITECTURE`)."""

from __future__ import annotations

from attnserve.models import bahdanau, captioner, luong, transformer
from attnserve.models.graph_contract import DYNAMIC_AXES, TEXT_INPUTS, Architecture, Tensor

__all__ = [
    "ARCHITECTURES",
    "BAHDANAU",
    "CAPTIONER",
    "DYNAMIC_AXES",
    "LUONG",
    "TEXT_INPUTS",
    "TRANSFORMER",
    "Architecture",
    "Tensor",
    "architecture",
]

BAHDANAU = bahdanau.ARCHITECTURE
LUONG = luong.ARCHITECTURE
TRANSFORMER = transformer.ARCHITECTURE
CAPTIONER = captioner.ARCHITECTURE
ARCHITECTURES = {a.name: a for a in (BAHDANAU, LUONG, TRANSFORMER, CAPTIONER)}


def architecture(name: str) -> Architecture:
    """The registered family called `name`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
