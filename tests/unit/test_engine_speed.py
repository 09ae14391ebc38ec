"""The engine speed bench: both engines on the same weights, a table and JSON, outputs compared;
and the step's FLOP count read from its graph."""

import json

import onnx

from attnserve.bench.engine_speed import EngineSpeedConfig, format_table, run_engine_speed
from attnserve.bench.step_flops import step_flops, weight_gemms
from attnserve.core.manifest import Manifest


def test_engine_speed_bench_runs_both_engines_on_the_same_weights(tiny_transformer_entry, tmp_path):
    cfg = EngineSpeedConfig(entry=tiny_transformer_entry, sentences=12, batch_sizes=(1, 5), rounds=1,
                            engines=("ort-fp32", "ct2-fp32", "ct2-fp32-packed"),
                            out=tmp_path / "speed.json")  # fmt: skip
    result = run_engine_speed(cfg)
    assert json.loads(cfg.out.read_text()) == json.loads(json.dumps(result))
    assert result["sentences"] == 12
    assert {(r["engine"], r["batch_size"]) for r in result["runs"]} == {
        (e, b) for e in cfg.engines for b in cfg.batch_sizes
    }
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in result["runs"])
    speed = {(r["engine"], r["batch_size"]): r["tokens_per_s"] for r in result["runs"]}
    for b in cfg.batch_sizes:  # against the faster CTranslate2 setting
        faster = max(speed["ct2-fp32", b], speed["ct2-fp32-packed", b])
        assert result["ratios"]["ort-fp32/ct2-fp32"][str(b)] == speed["ort-fp32", b] / faster
    # The converted model is the same model: greedy outputs agree (a wrong weight would not).
    assert result["identical_outputs"]["ort-fp32 = ct2-fp32"] == {"1": 12, "5": 12}
    table = format_table(result)
    assert "| ort-fp32/ct2-fp32 (the faster CTranslate2 setting) |" in table and "12/12" in table


def test_step_flops_counts_every_weight_gemm_of_the_decoder_step(tiny_transformer_entry):
    manifest = Manifest.load(tiny_transformer_entry)
    c = manifest.raw["model_config"]
    gemms = weight_gemms(onnx.load(str(manifest.path / manifest.decoder_step.file)).graph)
    d, f, layers, vocab = c["d_model"], c["ff_size"], c["decoder_layers"], c["tgt_vocab_size"]
    # Per layer: fused self Q/K/V, self output, cross query, cross output, two feed-forward layers;
    # then the output layer.
    assert gemms == {(d, 3 * d): layers, (d, d): 3 * layers, (d, f): layers, (f, d): layers, (d, vocab): 1}
    result = step_flops(tiny_transformer_entry, rows=4, threads=1)
    assert result["step_ms"] > 0 and result["gemms_alone_ms"] > 0 and result["step_gflops"] > 0
