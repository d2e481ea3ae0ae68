"""The ONNX step graph on onnxruntime: every mode emits the torch engine's tokens; int4 within tolerance."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the onnx extra")
pytest.importorskip("onnxscript", reason="needs the onnx extra")

import edge_dlm  # noqa: E402
from edge_dlm import cli  # noqa: E402
from edge_dlm.primitives.attention import CAUSAL  # noqa: E402
from edge_dlm.decoding import Draft  # noqa: E402
from edge_dlm.export.onnx import export_onnx  # noqa: E402
from edge_dlm.model.weights import load_model  # noqa: E402
from helpers import reference_kv, run_mode  # noqa: E402

PROMPT = [1, 40, 41, 42, 43, 44]
MODES = [("ar", {}), ("diffusion", {"steps": 2}), ("diffusion", {"steps": 4, "threshold": 0.5}),
         ("linear-spec", {}), ("quadratic-spec", {})]


@pytest.fixture(scope="module")
def onnx_dir(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(tiny_ckpt, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def ort(onnx_dir):
    from edge_dlm.engines.ort_engine import OrtEngine

    return OrtEngine(onnx_dir, torch.device("cpu"))


def test_artifact_and_manifest(onnx_dir):
    m = json.loads((onnx_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["targets"] == ["onnx"] and m["precision"] == "float32"
    assert len(m["source_sha256"]) == 64 and "onnxruntime" in m["tool_versions"]
    assert m["graph"]["lora"] and m["config"]["block_size"] == 4
    assert m["graph"]["inputs"] == ["input_ids", "position_ids", "attn_mask", "past_keys", "past_values", "use_lora"]
    assert not any(p.suffix == ".safetensors" for p in onnx_dir.rglob("*"))


@pytest.mark.parametrize("mode,kw", MODES, ids=[f"{m}{kw.get('steps', '')}" for m, kw in MODES])
def test_modes_emit_torch_tokens(tiny_model, ort, mode, kw):
    ref, _ = run_mode(tiny_model, PROMPT, mode, max_new_tokens=20, **kw)
    got, _ = run_mode(ort, PROMPT, mode, max_new_tokens=20, **kw)
    assert got.output_ids == ref.output_ids and got.nfe == ref.nfe


def test_lossless_invariants_on_ort(ort):
    ar, _ = run_mode(ort, PROMPT, "ar", max_new_tokens=24)
    for mode in ("linear-spec", "quadratic-spec"):
        spec, _ = run_mode(ort, PROMPT, mode, max_new_tokens=24)
        assert spec.output_ids == ar.output_ids
    # the cache a speculative run leaves equals the cache AR would hold for the same tokens
    dec, _ = run_mode(ort, PROMPT, "linear-spec", max_new_tokens=12)
    k, v = dec.cache.committed()
    ids = (PROMPT + dec.output_ids)[:dec.cache.length]
    rk, rv = reference_kv(ort, ids)
    torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)


def test_lora_input_switches_the_drafter(ort):
    assert ort.has_lora
    on, ev_on = run_mode(ort, PROMPT, "linear-spec", max_new_tokens=16)
    off, ev_off = run_mode(ort, PROMPT, "linear-spec", max_new_tokens=16, use_lora=False)
    assert on.output_ids == off.output_ids
    assert [e.tokens for e in ev_on if isinstance(e, Draft)] != [e.tokens for e in ev_off if isinstance(e, Draft)]


# Relative logit error of the int4 (MatMulNBits, block 64) graph vs fp32 torch on the demo model,
# 64 random tokens. Measured: 0.053.
INT4_TOL = 0.1


def test_int4_graph_within_tolerance(tmp_path):
    from edge_dlm.hub import DEMO_MODEL

    out = tmp_path / "int4"
    export_onnx(DEMO_MODEL, out, quant="int4", log=lambda *_: None)
    rt = edge_dlm.load(out, device="cpu")
    assert rt.engine == "onnxruntime"
    ref = load_model(DEMO_MODEL)
    x = torch.randint(5, 4000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref(x, torch.arange(64)[None])
        got = rt.model(x, torch.arange(64)[None], cache=rt.model.new_cache(64), attn=CAUSAL)
    rel = ((got - want).norm() / want.norm()).item()
    print(f"int4 ONNX relative logit error {rel:.4f}")
    assert 0.005 < rel < INT4_TOL  # really quantized, and still close
    assert (out / "model.onnx").stat().st_size < (DEMO_MODEL / "model.safetensors").stat().st_size


def test_cli_runs_the_artifact(onnx_dir, capsys):
    assert cli.main(["generate", "--model", str(onnx_dir), "--prompt", "hello", "--max-new-tokens", "6",
                     "--mode", "quadratic-spec", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "quadratic-spec"
    assert cli.main(["doctor", "--model", str(onnx_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["auto"] == "onnxruntime"
    torch_row = next(r for r in report["engines"] if r["engine"] == "torch")
    assert not torch_row["ok"] and "no safetensors" in torch_row["reasons"][0]
