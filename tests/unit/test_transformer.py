"""The Transformer: cached steps equal the parallel pass, masks hold, and the ONNX graphs match torch."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from attnserve.export.onnx_graphs import export_graph
from attnserve.models.architectures import TRANSFORMER
from attnserve.models.transformer import TransformerConfig, TransformerSeq2Seq

SRC_VOCAB, TGT_VOCAB = 20, 15
LAYERS = 3


def _model() -> TransformerSeq2Seq:
    torch.manual_seed(0)
    config = TransformerConfig(SRC_VOCAB, TGT_VOCAB, d_model=32, heads=4, encoder_layers=2,
                               decoder_layers=LAYERS, ff_size=48, max_positions=16)  # fmt: skip
    return TransformerSeq2Seq(config).eval()


def _batch():
    """Three rows, the second and third padded: src (3, 6), mask (3, 6), decoder inputs (3, 5)."""
    torch.manual_seed(1)
    src = torch.randint(3, SRC_VOCAB, (3, 6))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    tgt = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(3, TGT_VOCAB, (3, 4))], dim=1)
    return src.masked_fill(~mask, 0), mask, tgt


def _cross(encoded) -> list:
    """cross_k_0, cross_v_0, ... from encode()'s outputs."""
    return list(encoded[1 : 1 + 2 * LAYERS])


def _run_staggered(step, encoded, mask, tgt, offsets, capacity, seed=3):
    """Decodes tgt teacher-forced with row r joining the running batch at step offsets[r].

    Every row runs at every step: before it joins and after it ends it is fed a random token at a
    random position (as a reused slot would be), and every step's keys and values are written into
    caches of fixed capacity that start as large garbage. Returns the logits (B, T, V) of the rows'
    real positions and the last step's outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    B, T = tgt.shape
    dk = encoded[1].shape[-1]
    caches = [torch.randn(B, 4, capacity, dk, generator=gen) * 1e3 for _ in range(2 * LAYERS)]
    logits = torch.zeros(B, T, TGT_VOCAB)
    for g in range(T + max(offsets)):
        position = torch.tensor([g - o for o in offsets])
        live = (position >= 0) & (position < T)
        token = tgt[torch.arange(B), position.clamp(0, T - 1)]
        token = torch.where(live, token, torch.randint(3, TGT_VOCAB, (B,), generator=gen))
        position = torch.where(live, position, torch.randint(0, capacity - 1, (B,), generator=gen))
        out = step(token, position, *caches, *_cross(encoded), mask)
        for cache, new in zip(caches, out[1 : 1 + 2 * LAYERS], strict=True):
            cache[torch.arange(B), :, position] = torch.as_tensor(new)[:, :, 0]
        logits[live, position[live]] = torch.as_tensor(out[0])[live]
    return logits, out


def _stepwise(model, src, mask, tgt):
    """All rows in step from position 0, with a cache grown by one column per step; returns the
    logits (B, T, V) and the last step's outputs."""
    encoded = model.encode(src, mask)
    return _run_staggered(model.decode_step, encoded, mask, tgt, [0] * len(tgt), tgt.size(1) + 1)


def test_encode_returns_the_documented_shapes():
    model = _model()
    src, mask, _ = _batch()
    with torch.no_grad():
        memory, *rest = model.encode(src, mask)
    cross, empty, enc_attn = rest[: 2 * LAYERS], rest[2 * LAYERS : 4 * LAYERS], rest[-1]
    assert memory.shape == (3, 6, 32)
    assert all(t.shape == (3, 4, 6, 8) for t in cross)
    assert all(t.shape == (3, 4, 0, 8) for t in empty)
    assert enc_attn.shape == (3, 2, 4, 6, 6)


@torch.no_grad()
def test_steps_of_rows_at_different_positions_equal_the_teacher_forced_pass():
    model = _model()
    src, mask, tgt = _batch()
    parallel = model(src, mask, tgt)  # (B, T, V)
    stepwise, _ = _run_staggered(model.decode_step, model.encode(src, mask), mask, tgt, [0, 3, 1], 12)
    assert parallel.shape == (3, 5, TGT_VOCAB)
    torch.testing.assert_close(stepwise, parallel, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_first_step_runs_on_the_empty_caches_of_encode():
    model = _model()
    src, mask, tgt = _batch()
    encoded = model.encode(src, mask)
    empty = encoded[1 + 2 * LAYERS : 1 + 4 * LAYERS]
    out = model.decode_step(tgt[:, 0], torch.zeros(3, dtype=torch.long), *empty, *_cross(encoded), mask)
    torch.testing.assert_close(out[0], model(src, mask, tgt)[:, 0], atol=1e-5, rtol=1e-5)
    assert all(t.shape == (3, 4, 1, 8) for t in out[1 : 1 + 2 * LAYERS])
    assert out[-1].shape == (3, LAYERS, 4, 1)
    torch.testing.assert_close(out[-1], torch.ones(3, LAYERS, 4, 1))  # only itself to attend to


@torch.no_grad()
def test_self_attention_weights_skip_masked_cache_columns():
    model = _model()
    src, mask, tgt = _batch()
    _, out = _run_staggered(model.decode_step, model.encode(src, mask), mask, tgt, [0, 3, 1], 12)
    self_heads = out[-1]  # (B, L, H, T + 1) of the last step
    position = torch.tensor([7 - o for o in (0, 3, 1)])
    assert self_heads.shape == (3, LAYERS, 4, 13)
    torch.testing.assert_close(self_heads.sum(-1), torch.ones(3, LAYERS, 4))
    for row in range(3):
        if position[row] < 5:  # a live row reads its earlier columns and itself only
            assert torch.all(self_heads[row, ..., position[row] : 12] == 0)
            assert torch.all(self_heads[row, ..., : position[row]] > 0)


@torch.no_grad()
def test_padding_never_changes_a_sequence():
    model = _model()
    src, mask, tgt = _batch()
    both = model(src, mask, tgt)
    alone = model(src[2:, :2], mask[2:, :2], tgt[2:])
    torch.testing.assert_close(both[2], alone[0], atol=1e-5, rtol=1e-5)
    _, padded = _stepwise(model, src, mask, tgt)
    _, single = _stepwise(model, src[2:, :2], mask[2:, :2], tgt[2:])
    attention, self_heads = 1 + 2 * LAYERS, -1
    torch.testing.assert_close(padded[attention][2, :2], single[attention][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded[self_heads][2], single[self_heads][0], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_attention_rows_sum_to_one_and_skip_padding():
    model = _model()
    src, mask, tgt = _batch()
    enc_attn = model.encode(src, mask)[-1]
    _, out = _stepwise(model, src, mask, tgt)
    cross, cross_heads, self_heads = out[-3:]
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


def test_state_dict_names_are_those_of_training_checkpoints():
    names = set(_model().state_dict())
    wanted = {"decoder.0.self_attn.q.weight", "decoder.0.self_attn.k.bias", "decoder.2.cross_attn.v.weight"}
    assert wanted <= names
    assert not any("qkv" in n for n in names)


def test_onnx_graphs_match_torch_for_rows_at_different_positions(tmp_path):
    model = _model()
    arch = TRANSFORMER.for_config(model.config)
    # Trace with sizes unlike the checked ones (batch 2, source 4, a cache of 2) so fixed axes would show.
    torch.manual_seed(2)
    ex_src, ex_mask = torch.randint(3, SRC_VOCAB, (2, 4)), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        encoded = model.encode(ex_src, ex_mask)
        past = [torch.randn(2, 4, 2, 8) for _ in range(2 * LAYERS)]
        step_args = (torch.ones(2, dtype=torch.long), torch.tensor([1, 2]), *past, *_cross(encoded), ex_mask)
        export_graph(model, "encode", (ex_src, ex_mask), arch.encoder_inputs, arch.encoder_outputs,
                     tmp_path / "enc.onnx")  # fmt: skip
        export_graph(model, "decode_step", step_args, arch.decoder_inputs, arch.decoder_outputs,
                     tmp_path / "step.onnx")  # fmt: skip
    assert not model.training

    encoder = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    src, mask, tgt = _batch()
    onnx_enc = encoder.run(None, {"src_ids": src.numpy(), "src_mask": mask.numpy()})
    with torch.no_grad():
        torch_enc = model.encode(src, mask)
    for (name, _, _), got, want in zip(arch.encoder_outputs, onnx_enc, torch_enc, strict=True):
        assert got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0, err_msg=name)

    names = [n for n, _, _ in arch.decoder_inputs]

    def onnx_step(*args):
        return step.run(None, {n: np.asarray(a) for n, a in zip(names, args, strict=True)})

    with torch.no_grad():
        want_logits, want = _run_staggered(model.decode_step, torch_enc, mask, tgt, [2, 0, 1], 9)
    onnx_enc = [torch.from_numpy(t) for t in onnx_enc]
    got_logits, got = _run_staggered(onnx_step, onnx_enc, mask, tgt, [2, 0, 1], 9)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
    for (name, _, _), g, w in zip(arch.decoder_outputs, got, want, strict=True):
        assert g.shape == tuple(w.shape), name
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0, err_msg=name)
