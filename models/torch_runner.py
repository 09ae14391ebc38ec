"""Runs a PyTorch model behind the decode loop's numpy interface, wired like its ONNX graphs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attnserve.core.manifest import DecoderSpec
from attnserve.core.wiring import WiredStepModel
from attnserve.models.architectures import Architecture


def _graph(method, inputs: list, outputs: list):
    """A model method as a no-grad function of named numpy arrays to named numpy arrays."""
    in_names, out_names = [n for n, _, _ in inputs], [n for n, _, _ in outputs]

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in in_names]
        return {n: t.numpy() for n, t in zip(out_names, method(*args), strict=True)}

    return run


class TorchStepModel(WiredStepModel):
    """A model in eval mode as a StepModel (training-time evaluation and parity checks)."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model = model.eval()
        arch = arch.for_config(model.config)
        super().__init__(
            DecoderSpec(**arch.wiring),
            _graph(model.encode, arch.encoder_inputs, arch.encoder_outputs),
            _graph(model.decode_step, arch.decoder_inputs, arch.decoder_outputs),
            [(n, shape) for n, _, shape in arch.decoder_inputs],
        )
