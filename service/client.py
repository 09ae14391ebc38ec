"""A small synchronous client for attnserve.v1, used by the CLI, the benchmark and the tests."""

from __future__ import annotations

import grpc
import numpy as np

from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc


class Client:
    """Wraps a channel to a running attnserve."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 30.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.TranslatorStub(self.channel)
        self.timeout_s = timeout_s

    def translate(
        self,
        model: str,
        text: str,
        attention: bool = False,
        max_output_tokens: int = 0,
        beam_size: int = 0,
        length_penalty: float = 0.0,
        locale: str = "",
    ) -> pb.TranslateResponse:
        """Calls Translate.

        Raises:
            grpc.RpcError: with the server's status code and message.
        """
        options = _options(attention, max_output_tokens, beam_size, length_penalty)
        request = pb.TranslateRequest(model=model, text=text, options=options, locale=locale)
        return self.stub.Translate(request, timeout=self.timeout_s)

    def caption(
        self,
        model: str,
        image: bytes,
        attention: bool = False,
        max_output_tokens: int = 0,
        beam_size: int = 0,
        length_penalty: float = 0.0,
    ) -> pb.CaptionResponse:
        """Calls Caption with encoded PNG or JPEG bytes.

        Raises:
            grpc.RpcError: with the server's status code and message.
        """
        options = _options(attention, max_output_tokens, beam_size, length_penalty)
        request = pb.CaptionRequest(model=model, image=image, options=options)
        return self.stub.Caption(request, timeout=self.timeout_s)

    def list_models(self) -> pb.ListModelsResponse:
        """Calls ListModels."""
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _options(attention: bool, max_output_tokens: int, beam_size: int, length_penalty: float):
    mode = pb.ATTENTION_MODE_CROSS if attention else pb.ATTENTION_MODE_NONE
    return pb.TranslateOptions(
        attention=mode,
        max_output_tokens=max_output_tokens,
        beam_size=beam_size,
        length_penalty=length_penalty,
    )


def attention_maps(maps: pb.AttentionMaps) -> np.ndarray:
    """(steps, grid_height, grid_width) float32 array from AttentionMaps."""
    return np.asarray(maps.weights, dtype=np.float32).reshape(maps.steps, maps.grid_height, maps.grid_width)


def format_attention_maps(maps: pb.AttentionMaps) -> str:
    """Each word's map as a grid of weights, its strongest cell marked with *."""
    blocks = []
    for label, grid in zip(maps.labels, attention_maps(maps), strict=True):
        peak = np.unravel_index(grid.argmax(), grid.shape)
        rows = [
            " ".join(f"{w:.2f}" + ("*" if (y, x) == peak else " ") for x, w in enumerate(row))
            for y, row in enumerate(grid)
        ]
        blocks.append(f"{label}:\n  " + "\n  ".join(rows))
    return "\n".join(blocks)


def attention_array(matrix: pb.AttentionMatrix) -> np.ndarray:
    """(rows, cols) float32 array from an AttentionMatrix."""
    return np.asarray(matrix.weights, dtype=np.float32).reshape(matrix.rows, matrix.cols)


def format_attention(matrix: pb.AttentionMatrix) -> str:
    """The matrix as a text table: output tokens down, source tokens across."""
    weights = attention_array(matrix)
    width = max(4, *(len(c) for c in matrix.col_labels))
    label = max(4, *(len(r) for r in matrix.row_labels)) if matrix.row_labels else 4
    lines = [" " * label + " " + " ".join(c.rjust(width) for c in matrix.col_labels)]
    for name, row in zip(matrix.row_labels, weights, strict=True):
        lines.append(name.ljust(label) + " " + " ".join(f"{w:.2f}".rjust(width) for w in row))
    return "\n".join(lines)
