"""Runs an encoder and a decoder step by tensor name, wired as a manifest's `decoder` section says.

The same wiring drives ONNX Runtime sessions (serving, evaluation) and PyTorch modules (training
and parity), so both are fed exactly the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from attnserve.core.manifest import DecoderSpec

State = dict[str, np.ndarray]
Graph = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
EXTRA_PREFIX = "attention:"  # state entries holding extra attention outputs of the encoder
SOURCE_AXIS = "src_len"  # the axis name that marks a decoder input's source-length axis
CACHE_AXIS = -2  # cache inputs are (B, ..., T, X): one column per decoded position


class WiredStepModel:
    """An encoder and a decoder step over two named-tensor functions.

    Args:
        spec: where each decoder input's first value comes from and which outputs recur.
        encoder: named inputs -> named outputs.
        decoder: named inputs -> named outputs.
        decoder_inputs: the decoder step's inputs as (name, shape); shapes name their dynamic
            axes, and an axis named "src_len" is padded when rows of different sources share a batch.

    Raises:
        ValueError: if a decoder input other than the token and position has no initial value.
    """

    def __init__(
        self,
        spec: DecoderSpec,
        encoder: Graph,
        decoder: Graph,
        decoder_inputs: Sequence[tuple[str, Sequence[int | str | None]]],
    ):
        self.spec, self._encoder, self.run_decoder = spec, encoder, decoder
        fed = {spec.token_input, spec.position_input}
        self.state_inputs = [n for n, _ in decoder_inputs if n not in fed]
        unknown = set(self.state_inputs) - set(spec.initial_state)
        if unknown:
            raise ValueError(f"decoder inputs {sorted(unknown)} have no initial_state")
        self.source_axes = {
            n: list(shape).index(SOURCE_AXIS) for n, shape in decoder_inputs if SOURCE_AXIS in shape
        }

    def encode(self, inputs: dict[str, np.ndarray]) -> State:
        """The encoder's named inputs (batch first) -> the decoder step's initial inputs, plus the
        encoder's extra attention outputs under EXTRA_PREFIX + mode."""
        outputs = self._encoder(inputs)
        sources = {"encoder": outputs, "input": inputs}
        state = {}
        for name, origin in self.spec.initial_state.items():
            kind, _, key = origin.partition(":")
            state[name] = sources[kind][key]
        for mode, output in self.spec.encoder_attention.items():
            state[EXTRA_PREFIX + mode] = outputs[output]
        return state

    def step(self, prev_tokens: np.ndarray, state: State, positions: np.ndarray | None = None):
        """One step of rows that all started together (reference semantics for parity checks).

        Args:
            prev_tokens: (B,) int64.
            state: the decoder inputs from `encode` or the previous step.
            positions: (B,) int64 step index of each row; needed when the model takes positions.

        Returns:
            logits (B, V), attention (B, S) and the next state (caches grown by one column).
        """
        feeds = {self.spec.token_input: prev_tokens, **{k: state[k] for k in self.state_inputs}}
        if self.spec.position_input:
            feeds[self.spec.position_input] = positions
        outputs = self.run_decoder(feeds)
        new_state = dict(state)
        for out_name, in_name in self.spec.recurrent.items():
            new_state[in_name] = outputs[out_name]
        for out_name, in_name in self.spec.cache.items():
            new_state[in_name] = np.concatenate([state[in_name], outputs[out_name]], axis=CACHE_AXIS)
        return outputs[self.spec.logits_output], outputs[self.spec.attention_output], new_state
