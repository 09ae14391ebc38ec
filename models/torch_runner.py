"""Adapts a PyTorch encode()/decode_step() model to the numpy StepModel interface."""

from __future__ import annotations

import numpy as np
import torch

from attnserve.models.bahdanau import BahdanauSeq2Seq
from attnserve.service.runtime.decoding import State


class TorchBahdanauRunner:
    """Runs a BahdanauSeq2Seq in eval mode behind the decode loop's numpy interface."""

    def __init__(self, model: BahdanauSeq2Seq):
        self.model = model.eval()

    @torch.no_grad()
    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> State:
        """src_ids (B, S), src_mask (B, S) -> {state, memory, keys, src_mask}."""
        mask = torch.from_numpy(src_mask)
        memory, keys, state = self.model.encode(torch.from_numpy(src_ids), mask)
        return {"state": state.numpy(), "memory": memory.numpy(), "keys": keys.numpy(), "src_mask": src_mask}

    @torch.no_grad()
    def step(self, prev_tokens: np.ndarray, state: State):
        """prev_tokens (B,) -> logits (B, V), attention (B, S), next state."""
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        logits, new_state, weights = self.model.decode_step(
            torch.from_numpy(prev_tokens), t["state"], t["memory"], t["keys"], t["src_mask"]
        )
        return logits.numpy(), weights.numpy(), {**state, "state": new_state.numpy()}
