"""The Transformer: cached steps equal the parallel pass, masks hold, and the ONNX graphs match torch."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from attnserve.models.transformer import TransformerConfig, TransformerSeq2Seq

SRC_VOCAB, TGT_VOCAB = 20, 15
ENCODER_OUTPUTS = ["memory", "cross_k", "cross_v", "past_k", "past_v", "encoder_attention"]
STEP_INPUTS = ["prev_token", "past_k", "past_v", "cross_k", "cross_v", "src_mask"]
STEP_OUTPUTS = [
    "logits",
    "new_past_k",
    "new_past_v",
    "cross_attention",
    "cross_attention_heads",
    "self_attention_heads",
]


def _model() -> TransformerSeq2Seq:
    torch.manual_seed(0)
    config = TransformerConfig(SRC_VOCAB, TGT_VOCAB, d_model=32, heads=4, encoder_layers=2, decoder_layers=3,
                               ff_size=48, max_positions=16)  # fmt: skip
    return TransformerSeq2Seq(config).eval()


def _batch():
    """Three rows, the second and third padded: src (3, 6), mask (3, 6), decoder inputs (3, 5)."""
    torch.manual_seed(1)
    src = torch.randint(3, SRC_VOCAB, (3, 6))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    tgt = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(3, TGT_VOCAB, (3, 4))], dim=1)
    return src.masked_fill(~mask, 0), mask, tgt


@torch.no_grad()
def _stepwise(model, src, mask, tgt):
    """Runs decode_step over tgt with the cache; returns the stacked logits (B, T, V) and the last outputs."""
    _, cross_k, cross_v, past_k, past_v, _ = model.encode(src, mask)
    logits = []
    for t in range(tgt.size(1)):
        out = model.decode_step(tgt[:, t], past_k, past_v, cross_k, cross_v, mask)
        past_k, past_v = out[1], out[2]
        logits.append(out[0])
    return torch.stack(logits, dim=1), out


def test_encode_returns_the_documented_shapes():
    model = _model()
    src, mask, _ = _batch()
    with torch.no_grad():
        memory, cross_k, cross_v, past_k, past_v, enc_attn = model.encode(src, mask)
    assert memory.shape == (3, 6, 32)
    assert cross_k.shape == cross_v.shape == (3, 3, 4, 6, 8)
    assert past_k.shape == past_v.shape == (3, 3, 4, 0, 8)
    assert enc_attn.shape == (3, 2, 4, 6, 6)


def test_cached_steps_equal_the_parallel_teacher_forced_pass():
    model = _model()
    src, mask, tgt = _batch()
    with torch.no_grad():
        parallel = model(src, mask, tgt)  # (B, T, V)
    stepwise, (_, past_k, _, _, cross_heads, self_heads) = _stepwise(model, src, mask, tgt)
    assert parallel.shape == (3, 5, TGT_VOCAB)
    torch.testing.assert_close(stepwise, parallel, atol=1e-5, rtol=1e-5)
    assert past_k.shape == (3, 3, 4, 5, 8)
    assert cross_heads.shape == (3, 3, 4, 6) and self_heads.shape == (3, 3, 4, 5)


def test_padding_never_changes_a_sequence():
    model = _model()
    src, mask, tgt = _batch()
    with torch.no_grad():
        both = model(src, mask, tgt)
        alone = model(src[2:, :2], mask[2:, :2], tgt[2:])
    torch.testing.assert_close(both[2], alone[0], atol=1e-5, rtol=1e-5)
    _, padded = _stepwise(model, src, mask, tgt)
    _, single = _stepwise(model, src[2:, :2], mask[2:, :2], tgt[2:])
    torch.testing.assert_close(padded[3][2, :2], single[3][0], atol=1e-6, rtol=1e-5)  # cross attention
    torch.testing.assert_close(padded[5][2], single[5][0], atol=1e-6, rtol=1e-5)  # self attention


def test_attention_rows_sum_to_one_and_skip_padding():
    model = _model()
    src, mask, tgt = _batch()
    with torch.no_grad():
        *_, enc_attn = model.encode(src, mask)
    _, (_, _, _, cross, cross_heads, self_heads) = _stepwise(model, src, mask, tgt)
    for weights in (enc_attn, cross, cross_heads, self_heads):
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    pad = ~mask  # (B, S)
    assert torch.all(enc_attn.masked_select(pad[:, None, None, None, :].expand_as(enc_attn)) == 0)
    assert torch.all(cross[pad] == 0) and torch.all(cross[mask] > 0)
    assert torch.all(cross_heads.masked_select(pad[:, None, None, :].expand_as(cross_heads)) == 0)


def test_a_future_target_token_never_changes_earlier_logits():
    model = _model()
    src, mask, tgt = _batch()
    changed = tgt.clone()
    changed[:, 3] = (tgt[:, 3] - 2) % (TGT_VOCAB - 3) + 3  # another real token at position 3
    assert torch.all(changed[:, 3] != tgt[:, 3])
    with torch.no_grad():
        before, after = model(src, mask, tgt), model(src, mask, changed)
    torch.testing.assert_close(after[:, :3], before[:, :3], atol=0, rtol=0)
    assert (after[:, 3:] - before[:, 3:]).abs().amax() > 1e-3  # the change is seen from there on


def test_every_parameter_learns():
    model = _model().train()
    src, mask, tgt = _batch()
    logits = model(src, mask, tgt)
    target = tgt.roll(-1, 1)
    torch.nn.functional.cross_entropy(logits.reshape(-1, TGT_VOCAB), target.reshape(-1)).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused


def test_config_rejects_heads_that_do_not_divide_the_model_size():
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerConfig(5, 5, d_model=30, heads=4)


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask):
        return self.model.encode(src_ids, src_mask)


class _DecoderStep(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prev_token, past_k, past_v, cross_k, cross_v, src_mask):
        return self.model.decode_step(prev_token, past_k, past_v, cross_k, cross_v, src_mask)


def _export(module, args, path, inputs, outputs, axes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-path deprecation and tracer chatter
        torch.onnx.export(
            module.eval(),  # the wrapper's mode is restored recursively after export: keep it eval
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: axes[name] for name in inputs + outputs},
        )


def test_onnx_encoder_and_decoder_step_match_torch(tmp_path):
    model = _model()
    B, S, P = "batch", "src_len", "past_len"
    axes = {
        "src_ids": {0: B, 1: S},
        "src_mask": {0: B, 1: S},
        "memory": {0: B, 1: S},
        "cross_k": {0: B, 3: S},
        "cross_v": {0: B, 3: S},
        "past_k": {0: B, 3: P},
        "past_v": {0: B, 3: P},
        "encoder_attention": {0: B, 3: S, 4: S},
        "prev_token": {0: B},
        "logits": {0: B},
        "new_past_k": {0: B, 3: "new_len"},
        "new_past_v": {0: B, 3: "new_len"},
        "cross_attention": {0: B, 1: S},
        "cross_attention_heads": {0: B, 3: S},
        "self_attention_heads": {0: B, 3: "new_len"},
    }
    # Trace with sizes unlike the checked ones (batch 2, source 4, a cache of 2) so fixed axes would show.
    torch.manual_seed(2)
    ex_src, ex_mask = torch.randint(3, SRC_VOCAB, (2, 4)), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        _, ex_ck, ex_cv, _, _, _ = model.encode(ex_src, ex_mask)
        ex_past = torch.randn(2, 3, 4, 2, 8)
        _export(_Encoder(model), (ex_src, ex_mask), tmp_path / "enc.onnx", ["src_ids", "src_mask"],
                ENCODER_OUTPUTS, axes)  # fmt: skip
        step_args = (torch.ones(2, dtype=torch.long), ex_past, ex_past, ex_ck, ex_cv, ex_mask)
        _export(_DecoderStep(model), step_args, tmp_path / "step.onnx", STEP_INPUTS, STEP_OUTPUTS, axes)
    assert not model.training

    encoder = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    src, mask, tgt = _batch()
    onnx_enc = encoder.run(None, {"src_ids": src.numpy(), "src_mask": mask.numpy()})
    with torch.no_grad():
        torch_enc = model.encode(src, mask)
    for name, got, want in zip(ENCODER_OUTPUTS, onnx_enc, torch_enc, strict=True):
        assert got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0, err_msg=name)

    _, cross_k, cross_v, past_k, past_v, _ = onnx_enc
    t_past_k, t_past_v = torch_enc[3], torch_enc[4]
    for t in range(2):  # the first step starts from the empty cache (past_len 0)
        values = (tgt[:, t].numpy(), past_k, past_v, cross_k, cross_v, mask.numpy())
        feeds = dict(zip(STEP_INPUTS, values, strict=True))
        got = step.run(None, feeds)
        with torch.no_grad():
            want = model.decode_step(tgt[:, t], t_past_k, t_past_v, torch_enc[1], torch_enc[2], mask)
        for name, g, w in zip(STEP_OUTPUTS, got, want, strict=True):
            assert g.shape == tuple(w.shape), (t, name)
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0, err_msg=f"step {t}: {name}")
        assert got[1].shape[3] == t + 1
        past_k, past_v, t_past_k, t_past_v = got[1], got[2], want[1], want[2]
