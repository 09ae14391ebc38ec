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
    ) -> pb.TranslateResponse:
        """Calls Translate.

        Raises:
            grpc.RpcError: with the server's status code and message.
        """
        mode = pb.ATTENTION_MODE_CROSS if attention else pb.ATTENTION_MODE_NONE
        request = pb.TranslateRequest(
            model=model,
            text=text,
            options=pb.TranslateOptions(
                attention=mode,
                max_output_tokens=max_output_tokens,
                beam_size=beam_size,
                length_penalty=length_penalty,
            ),
        )
        return self.stub.Translate(request, timeout=self.timeout_s)

    def list_models(self) -> pb.ListModelsResponse:
        """Calls ListModels."""
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
