"""Which layers and heads of a per-head attention mode a request gets back, how they are reduced,
and the bound that keeps every response small enough to send."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

# The most attention weights one response may carry: float32s, so about 4 MB, gRPC's default
# limit on a message a client accepts.
MAX_ATTENTION_WEIGHTS = 1_000_000


class Reduction(Enum):
    """How the selected heads of a layer come back."""

    NONE = "none"  # one matrix per head
    MEAN = "mean"  # one matrix per layer: the heads' mean
    MAX = "max"  # one matrix per layer: the heads' element-wise maximum


@dataclass(frozen=True)
class HeadSelection:
    """Layers and heads to return (empty: all of them), and their reduction."""

    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    reduction: Reduction = Reduction.NONE

    @property
    def everything(self) -> bool:
        """Every layer and head, one matrix each (what a request that selects nothing gets)."""
        return not self.layers and not self.heads and self.reduction is Reduction.NONE

    def problem(self, layers: int, heads: int) -> str | None:
        """Why this selection does not fit a model of `layers` x `heads`, or None."""
        for name, chosen, count in (("layer", self.layers, layers), ("head", self.heads, heads)):
            bad = sorted({i for i in chosen if i >= count})
            if bad:
                return f"the model has {count} {name}s (0-{count - 1}); no {name} {', '.join(map(str, bad))}"
            if len(set(chosen)) != len(chosen):
                return f"{name}s are listed twice: {list(chosen)}"
        return None

    def matrices(self, layers: int, heads: int) -> int:
        """How many matrices a response carries for a model of `layers` x `heads`."""
        per_layer = 1 if self.reduction is not Reduction.NONE else len(self.heads) or heads
        return (len(self.layers) or layers) * per_layer

    def apply(self, weights: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """(layer, head, matrix) of (L, H, rows, cols) weights as selected; a reduced layer's
        matrix has head 0 (the reduction says which heads it holds)."""
        layers = list(self.layers) or list(range(weights.shape[0]))
        heads = list(self.heads) or list(range(weights.shape[1]))
        chosen = weights[np.ix_(layers, heads)]  # (l, h, rows, cols)
        if self.reduction is Reduction.NONE:
            pairs = [(i, layer, j, head) for i, layer in enumerate(layers) for j, head in enumerate(heads)]
            return [(layer, head, chosen[i, j]) for i, layer, j, head in pairs]
        reduce = np.mean if self.reduction is Reduction.MEAN else np.max
        return [(layer, 0, reduce(chosen[i], axis=0)) for i, layer in enumerate(layers)]


ALL_HEADS = HeadSelection()  # every layer and head, one matrix each
