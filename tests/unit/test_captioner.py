"""The show-attend-tell captioner: shapes, attention, stepwise = teacher-forced, penalty, ONNX parity."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from attnserve.models.captioner import Captioner, CaptionerConfig

V = 20


def _model(**overrides) -> Captioner:
    torch.manual_seed(0)
    config = dict(
        vocab_size=V, channels=(8, 16), embed_size=8, decoder_size=16, attention_size=8, dropout=0.0
    )
    return Captioner(CaptionerConfig(**{**config, **overrides}))


def _batch(B=3, T=6):
    torch.manual_seed(1)
    return torch.rand(B, 1, 56, 56), torch.randint(3, V, (B, T))


def test_config_grid_and_validation():
    config = CaptionerConfig(vocab_size=V, channels=(8, 16))
    assert (config.stride, config.grid_height, config.grid_width, config.memory_size) == (4, 14, 14, 16)
    assert CaptionerConfig(vocab_size=V, channels=(8, 8, 8)).grid_height == 7
    with pytest.raises(ValueError, match="not a multiple"):
        CaptionerConfig(vocab_size=V, channels=(8,) * 4)  # 56 is not a multiple of 16


@pytest.mark.parametrize("gate", [True, False])
def test_shapes_and_attention_rows_sum_to_one(gate):
    model = _model(gate=gate).eval()
    images, tgt_in = _batch()
    with torch.no_grad():
        memory, keys, h, c = model.encode(images)
        logits, attention = model(images, tgt_in)
    assert memory.shape == (3, 196, 16) and keys.shape == (3, 196, 8)
    assert h.shape == c.shape == (3, 16)
    assert logits.shape == (3, 6, V) and attention.shape == (3, 6, 196)
    assert torch.all(attention >= 0)
    torch.testing.assert_close(attention.sum(2), torch.ones(3, 6))


def test_teacher_forced_forward_equals_the_stepwise_loop():
    model = _model().eval()
    images, tgt_in = _batch()
    with torch.no_grad():
        logits, attention = model(images, tgt_in)
        memory, keys, h, c = model.encode(images)
        for t in range(tgt_in.size(1)):
            step_logits, h, c, weights = model.decode_step(tgt_in[:, t], h, c, memory, keys)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(weights, attention[:, t], atol=1e-6, rtol=1e-5)
        # A batch row does not depend on the other rows (eval-mode batch norm).
        alone, _ = model(images[1:2], tgt_in[1:2])
    torch.testing.assert_close(alone[0], logits[1], atol=1e-5, rtol=1e-5)


def _field(model: Captioner) -> int:
    """Rows of pixels the feature of a central grid cell depends on (its receptive field)."""
    images, _ = _batch(B=1)
    images.requires_grad_(True)
    memory = model.eval().encode(images)[0]  # (1, N, C)
    assert memory.shape == (1, 14 * 14, 16)  # the grid does not change
    (pixels,) = torch.autograd.grad(memory[0, 7 * 14 + 7].sum(), images)  # (1, 1, 56, 56)
    rows = torch.nonzero(pixels[0, 0].abs().sum(1)).flatten()
    return int(rows.max() - rows.min() + 1)


def test_stem_and_dilated_layers_keep_the_grid_and_let_a_cell_see_a_whole_item():
    assert _field(_model()) == 19  # 3x3 convolutions at strides 2, 1, 2, 1
    assert _field(_model(stem_channels=4, context_layers=2)) > 28  # a Fashion-MNIST item is 28 pixels


def test_every_parameter_learns():
    model = _model(dropout=0.1)
    images, tgt_in = _batch(B=4)
    logits, attention = model(images, tgt_in)
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), tgt_in.roll(-1, 1).reshape(-1))
    (loss + model.doubly_stochastic_penalty(attention, tgt_in > 0)).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused


def test_doubly_stochastic_penalty_on_constructed_attention():
    model = _model(alpha_c=0.5)
    attention = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # every cell gets exactly 1
            [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],  # cells get 2, 0, (masked) 1
        ]
    )
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # Row 0: (1-1)^2 * 3 = 0. Row 1: the third step is padding, sums (2, 0, 0) -> 1 + 1 + 1 = 3.
    assert model.doubly_stochastic_penalty(attention, mask).item() == pytest.approx(0.5 * (0 + 3) / 2)
    uniform = torch.full((1, 4, 8), 1 / 8)
    # 8 cells, each summing to 4/8 over 4 steps: 8 * (1/2)^2 = 2.
    assert model.doubly_stochastic_penalty(uniform, torch.ones(1, 4, dtype=torch.bool)).item() == 1.0


class _Encode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode(images)


class _Step(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prev_token, h, c, memory, keys):
        return self.model.decode_step(prev_token, h, c, memory, keys)


def _export(module, args, path, inputs, outputs):
    # An exporter puts a module back in the mode it found it in, children included: a wrapper left
    # in training mode would switch the model's batch norm to batch statistics after the export.
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("widen", [{}, {"stem_channels": 4, "context_layers": 2}])
def test_onnx_round_trip_of_encode_and_decode_step(tmp_path, widen):
    model = _model(**widen).eval()
    images, tgt_in = _batch(B=2)
    with torch.no_grad():
        memory, keys, h, c = model.encode(images)
        encoder = _export(
            _Encode(model), (images,), tmp_path / "enc.onnx", ["images"], ["memory", "keys", "h", "c"]
        )
        step = _export(
            _Step(model),
            (tgt_in[:, 0], h, c, memory, keys),
            tmp_path / "step.onnx",
            ["prev_token", "h", "c", "memory", "keys"],
            ["logits", "new_h", "new_c", "attention"],
        )
        assert not model.training
        # Run a batch size other than the exported one, greedy feedback through both runtimes.
        images, tgt_in = _batch(B=5)
        want = model.encode(images)
        got = encoder.run(None, {"images": images.numpy()})
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
        _, _, h, c = want
        o_h, o_c, o_memory, o_keys = got[2], got[3], got[0], got[1]
        token = tgt_in[:, 0]
        for _ in range(4):
            logits, h, c, weights = model.decode_step(token, h, c, want[0], want[1])
            o_logits, o_h, o_c, o_weights = step.run(
                None, {"prev_token": token.numpy(), "h": o_h, "c": o_c, "memory": o_memory, "keys": o_keys}
            )
            for w, g in ((logits, o_logits), (h, o_h), (c, o_c), (weights, o_weights)):
                np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
            token = logits.argmax(1)
            assert np.array_equal(o_logits.argmax(1), token.numpy())
