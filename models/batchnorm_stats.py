"""Gives a model whose BatchNorms are identities (rebuilt from graphs that folded them into their
convolutions) the statistics of its data, so that training can continue in train mode.

A BatchNorm in train mode normalises by its batch's statistics. After folding, an identity
BatchNorm's input no longer has mean 0 and variance 1, so training from it would change the
function at the first step (and the running statistics would drift towards the batch's). Here each
BatchNorm gets its input's measured per-channel mean m and variance v as running statistics, and
scale sqrt(v + eps) and shift bias + m, which compute in eval mode exactly what it computed before,
and in train mode about the same: training then continues as it ran before the export.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from attnserve.models.architectures import architecture
from attnserve.models.checkpoint import load_checkpoint, save_checkpoint
from attnserve.models.tasks.base import TextTask

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], run: Callable) -> int:
    """Re-parameterises every BatchNorm around its input's statistics, keeping what it computes.

    Args:
        model: the model; put back in the mode it was in.
        batches: inputs of `run`, e.g. (images,) for an image encoder.
        run: called as run(model, *batch) in eval mode; must pass every BatchNorm.

    Returns:
        How many BatchNorms were re-parameterised.

    Raises:
        ValueError: if a BatchNorm saw no input.
    """
    layers = batchnorms(model)
    sums: dict[int, list] = {}

    def record(module: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].transpose(0, 1).flatten(1).double()  # (channels, everything else)
        found = sums.setdefault(id(module), [0, 0.0, 0.0])
        found[0] += x.shape[1]
        found[1] = found[1] + x.sum(1)
        found[2] = found[2] + (x * x).sum(1)

    training = model.training
    model.eval()
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        for batch in batches:
            run(model, *batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    for layer in layers:
        if id(layer) not in sums:
            raise ValueError(f"a BatchNorm ({layer}) saw no input")
        count, total, squares = sums[id(layer)]
        mean = total / count  # (channels,)
        var = (squares / count - mean * mean).clamp_min(0.0)
        # Before: y = (x - m0) / sqrt(v0 + eps) * w0 + b0 = a x + c; after: the same a and c.
        scale = layer.weight.double() / torch.sqrt(layer.running_var.double() + layer.eps)
        shift = layer.bias.double() - layer.running_mean.double() * scale
        std = torch.sqrt(var + layer.eps)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.weight.copy_(scale * std)
        layer.bias.copy_(shift + scale * mean)
    return len(layers)


def recalibrate_checkpoint(path: Path, task: TextTask, examples: int = 2048) -> int:
    """Re-parameterises a checkpoint's BatchNorms (in place) around the statistics of the
    encoder inputs of `examples` of the task's training examples; a model without any is left alone.

    Returns:
        How many BatchNorms were re-parameterised.
    """
    model, src_vocab, tgt_vocab, payload = load_checkpoint(path)
    if not batchnorms(model):
        return 0
    names = [name for name, _, _ in architecture(payload["architecture"]).encoder_inputs]
    batches = task.train_batches(0, 64, random.Random(0), src_vocab, tgt_vocab, examples)
    inputs = [tuple(torch.from_numpy(batch[name]) for name in names) for batch in batches]
    count = recalibrate(model, inputs, lambda model, *x: model.encode(*x))
    save_checkpoint(path, payload["architecture"], model, src_vocab, tgt_vocab, **payload["meta"])
    return count
