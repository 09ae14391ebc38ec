"""The engine speed bench: both engines on the same weights, a table and JSON, outputs compared."""

import json

from attnserve.bench.engine_speed import EngineSpeedConfig, format_table, run_engine_speed


def test_engine_speed_bench_runs_both_engines_on_the_same_weights(tiny_transformer_entry, tmp_path):
    cfg = EngineSpeedConfig(entry=tiny_transformer_entry, sentences=12, batch_sizes=(1, 5),
                            engines=("ort-fp32", "ct2-fp32"), out=tmp_path / "speed.json")  # fmt: skip
    result = run_engine_speed(cfg)
    assert json.loads(cfg.out.read_text()) == json.loads(json.dumps(result))
    assert result["sentences"] == 12
    assert {(r["engine"], r["batch_size"]) for r in result["runs"]} == {
        (e, b) for e in cfg.engines for b in cfg.batch_sizes
    }
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in result["runs"])
    # The converted model is the same model: greedy outputs agree (a wrong weight would not).
    assert result["identical_outputs"]["ort-fp32 = ct2-fp32"] == {"1": 12, "5": 12}
    table = format_table(result)
    assert "| ort-fp32/ct2-fp32 |" in table and "12/12" in table
