"""Checkpoints: state_dict + config + vocabularies + format revision (never pickled modules)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from attnserve.core.vocab import Vocab
from attnserve.models.architectures import architecture

FORMAT_REVISION = 1


def save_checkpoint(
    path: Path, architecture: str, model: torch.nn.Module, src_vocab: Vocab, tgt_vocab: Vocab, **meta: Any
) -> None:
    """Writes a checkpoint that `load_checkpoint` reads back with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_revision": FORMAT_REVISION,
        "architecture": architecture,
        "config": asdict(model.config),
        "state_dict": model.state_dict(),
        "src_vocab": list(src_vocab.tokens),
        "tgt_vocab": list(tgt_vocab.tokens),
        "meta": meta,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, Vocab, Vocab, dict[str, Any]]:
    """Loads (model in eval mode, source vocab, target vocab, payload without the weights).

    Raises:
        ValueError: for an unknown format revision or architecture.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_revision") != FORMAT_REVISION:
        raise ValueError(
            f"{path}: checkpoint format revision {payload.get('format_revision')} is not {FORMAT_REVISION}"
        )
    try:
        arch = architecture(payload["architecture"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model = arch.model_cls(arch.config_cls(**payload["config"]))
    model.load_state_dict(payload.pop("state_dict"))
    return model.eval(), Vocab(tuple(payload["src_vocab"])), Vocab(tuple(payload["tgt_vocab"])), payload
