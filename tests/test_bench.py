"""`edge-dlm bench` on a tiny model: the JSON fields, the baselines, the ratios."""

from __future__ import annotations

import json

import pytest

from edge_dlm.cli import main


def test_bench_json_fields(tiny_ckpt, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "--model", str(tiny_ckpt), "--json", "--max-new-tokens", "6", "--num-prompts", "2",
                 "--repeats", "1", "--warmup", "0", "--steps", "2", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["rows"]]
    assert names == ["transformers generate", "ar", "diffusion S=2", "diffusion S=4", "linear-spec",
                     "quadratic-spec"]
    rows = {r["name"]: r for r in out["rows"]}
    for r in out["rows"]:
        for key in ("tokens_per_s", "tpf", "mean_accepted", "ttft_s", "peak_mem_mb", "joules_per_token",
                    "vs_ar", "vs_transformers"):
            assert key in r
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["vs_ar"] == pytest.approx(r["tokens_per_s"] / rows["ar"]["tokens_per_s"])
        assert r["vs_transformers"] == pytest.approx(
            r["tokens_per_s"] / rows["transformers generate"]["tokens_per_s"])
    assert rows["ar"]["tpf"] == pytest.approx(1.0)
    assert rows["linear-spec"]["mean_accepted"] >= 1 and rows["ar"]["mean_accepted"] is None
    assert out["meta"]["energy"] in ("n/a", "RAPL", "NVML")
    assert out["meta"]["engine"] == "torch" and out["meta"]["quant"] is None


def test_bench_quantized_has_no_transformers_row(tiny_ckpt, capsys):
    assert main(["bench", "--model", str(tiny_ckpt), "--quant", "int8", "--group-size", "32", "--json",
                 "--modes", "ar", "linear-spec", "--max-new-tokens", "4", "--num-prompts", "1", "--repeats", "1",
                 "--warmup", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meta"]["quant"] == "int8" and [r["name"] for r in out["rows"]] == ["ar", "linear-spec"]


def test_bench_without_baseline_still_compares_to_ar(tiny_ckpt, capsys):
    assert main(["bench", "--model", str(tiny_ckpt), "--modes", "linear-spec", "--no-baseline",
                 "--max-new-tokens", "4", "--num-prompts", "1", "--repeats", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "| ar |" in table and "| linear-spec |" in table and "transformers generate" not in table


def test_bench_bad_prompts_file(tiny_ckpt, capsys):
    assert main(["bench", "--model", str(tiny_ckpt), "--prompts", "/nonexistent.txt", "--no-baseline"]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_shape_bench_times_each_pass_width(capsys):
    import argparse
    import dataclasses

    from edge_dlm.cli.bench_shapes import run_shapes, shape_config

    cfg = dataclasses.replace(shape_config("3b", layers=1), vocab_size=512, hidden_size=256,
                              intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=64, block_size=4)
    args = argparse.Namespace(device="cpu", dtype="float32", repeats=1, json=True, shape="3b", quant="int4",
                              group_size=64, kernels="auto", layers=None)
    assert run_shapes(args, cfg=cfg, context=16) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["weights"], r["tokens"]) for r in out["rows"]] == [
        ("float32", 1), ("float32", 4), ("float32", 20), ("int4 g64", 1), ("int4 g64", 4), ("int4 g64", 20)]
    assert all(r["ms"] > 0 and r["vs_floor"] > 0 and r["graph_ms"] is None for r in out["rows"])  # no CUDA
    gb, bw = out["meta"]["weight_gb"], out["meta"]["copy_bandwidth_gbs"]
    assert gb["int4 g64"] < 0.2 * gb["float32"] and bw > 0
    for r in out["rows"]:  # the read floor: weight bytes / the copy's bytes per second (reads + writes)
        assert r["floor_ms"] == pytest.approx(gb[r["weights"]] / bw * 1000)
        assert r["vs_float"] == pytest.approx(1.0) if r["weights"] == "float32" else r["vs_float"] > 0


def test_shape_bench_bad_layers(capsys):
    assert main(["bench", "--shape", "3b", "--layers", "0"]) == 2
    assert "--layers" in capsys.readouterr().err
