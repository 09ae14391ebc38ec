"""Runs an encoder and a decoder step by tensor name, wired as a manifest's `decoder` section says.

The same wiring drives ONNX Runtime sessions (serving, evaluation) and PyTorch modules (training
and parity), so both are fed exactly the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from attnserve.service.core.decoding import EXTRA_PREFIX, State
from attnserve.service.core.manifest import DecoderSpec

Graph = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class WiredStepModel:
    """A StepModel over two named-tensor functions (encoder, decoder step).

    Args:
        spec: where each decoder input's first value comes from and which outputs recur.
        encoder: named inputs -> named outputs.
        decoder: named inputs -> named outputs.
        decoder_inputs: the decoder step's input names.

    Raises:
        ValueError: if a decoder input other than the token has no initial value.
    """

    def __init__(self, spec: DecoderSpec, encoder: Graph, decoder: Graph, decoder_inputs: Sequence[str]):
        self.spec, self._encoder, self._decoder = spec, encoder, decoder
        self._state_inputs = [n for n in decoder_inputs if n != spec.token_input]
        unknown = set(self._state_inputs) - set(spec.initial_state)
        if unknown:
            raise ValueError(f"decoder inputs {sorted(unknown)} have no initial_state")

    def encode(self, inputs: dict[str, np.ndarray]) -> State:
        """The encoder's named inputs (batch first) -> the decoder step's initial inputs."""
        outputs = self._encoder(inputs)
        sources = {"encoder": outputs, "input": inputs}
        state = {}
        for name, origin in self.spec.initial_state.items():
            kind, _, key = origin.partition(":")
            state[name] = sources[kind][key]
        for mode, output in self.spec.encoder_attention.items():
            state[EXTRA_PREFIX + mode] = outputs[output]
        return state

    def step(self, prev_tokens: np.ndarray, state: State):
        """prev_tokens (B,) int64 -> logits (B, V), attention (B, S), next state."""
        outputs = self._decoder(
            {self.spec.token_input: prev_tokens, **{k: state[k] for k in self._state_inputs}}
        )
        new_state = dict(state)
        for out_name, in_name in self.spec.recurrent.items():
            new_state[in_name] = outputs[out_name]
        for mode, output in self.spec.step_attention.items():
            new_state[EXTRA_PREFIX + mode] = outputs[output]
        return outputs[self.spec.logits_output], outputs[self.spec.attention_output], new_state
