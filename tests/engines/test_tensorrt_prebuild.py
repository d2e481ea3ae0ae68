"""Everything up to TensorRT's builder: operator set, profiles vs the modes' shapes, the engine cache key.

TensorRT cannot be installed on CI (platform.md); the test that builds an engine is marked and skips.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the onnx extra")
pytest.importorskip("onnxscript", reason="needs the onnx extra")

import onnx  # noqa: E402

from edge_dlm.export.onnx import GRAPH_FILE, export_graph  # noqa: E402
from edge_dlm.export.tensorrt import (OPS_FILE, cache_key, graph_ops, make_tensorrt_compatible,  # noqa: E402
                                      profile_for, profiles, quantize_qdq, supported_ops, unsupported_ops)
from helpers import run_mode  # noqa: E402


@pytest.fixture(scope="module")
def graph(tiny_ckpt, tmp_path_factory):
    """The step graph as the TensorRT exporter traces it (`export_graph`; the onnxruntime artifact's
    graph also has onnxruntime's own fused operators)."""
    from edge_dlm.model.weights import load_model

    out = tmp_path_factory.mktemp("trt") / GRAPH_FILE
    export_graph(load_model(tiny_ckpt, dtype=torch.float32, lora=True), out, torch.float32)
    return out


def test_ops_list_names_its_source():
    head = OPS_FILE.read_text().splitlines()[:3]
    assert any("onnx/onnx-tensorrt" in line and "operators.md" in line for line in head)
    assert {"MatMul", "Softmax", "DequantizeLinear"} <= supported_ops() and "MatMulNBits" not in supported_ops()


def test_graph_uses_only_tensorrt_operators_after_rewrite(graph, tmp_path):
    model = onnx.load(str(graph))
    assert unsupported_ops(model) == ["Reciprocal"]  # rsqrt: the checker does catch gaps
    fixed = make_tensorrt_compatible(model)
    assert unsupported_ops(fixed) == []
    # the rewrite is exact: onnxruntime gives the same outputs before and after
    import numpy as np
    import onnxruntime as ort

    path = tmp_path / "fixed.onnx"
    onnx.save(fixed, str(path))
    feeds = {"input_ids": np.array([[5, 6, 7]]), "position_ids": np.array([[2, 3, 4]]),
             "attn_mask": np.tril(np.ones((3, 5), bool), k=2), "past_keys": np.random.default_rng(0).random((2, 2, 2, 16), np.float32),
             "past_values": np.random.default_rng(1).random((2, 2, 2, 16), np.float32), "use_lora": np.array(1.0, np.float32)}
    a = ort.InferenceSession(str(graph)).run(None, feeds)
    b = ort.InferenceSession(str(path)).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6)  # 1/sqrt vs rsqrt: a few float32 ulps


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_qdq_graph_is_tensorrt_parsable(graph, tmp_path, bits):
    path = tmp_path / "q.onnx"
    path.write_bytes(graph.read_bytes())
    quantize_qdq(path, bits, 32)
    model = make_tensorrt_compatible(onnx.load(str(path)))
    assert "DequantizeLinear" in graph_ops(model) and unsupported_ops(model) == []


def test_profiles_cover_every_pass_of_every_mode(tiny_model):
    cfg = tiny_model.config
    profs = profiles(cfg.block_size, 512, max_prefill=64)
    passes = []

    class Recorder:  # the engine contract, recording (T, cached) for each pass
        config = cfg

        def new_cache(self, n):
            return tiny_model.new_cache(n)

        def __call__(self, tokens, positions, *, cache, attn, use_lora=False, last_only=False):
            passes.append((tokens.shape[1], cache.length))
            return tiny_model(tokens, positions, cache=cache, attn=attn, use_lora=use_lora, last_only=last_only)

    for mode, kw in [("ar", {}), ("diffusion", {"steps": 2}), ("linear-spec", {}), ("quadratic-spec", {})]:
        run_mode(Recorder(), list(range(1, 30)), mode, max_new_tokens=40, **kw)
    assert {t for t, _ in passes} >= {1, cfg.block_size, cfg.block_size * (cfg.block_size + 1), 29, 29 + 4}
    for t, cached in passes:
        assert profile_for(profs, t, cached) is not None, (t, cached)


def test_profiles_at_real_nld_shape():
    profs = profiles(32, 16384)
    fixed = [p["T"] for p in profs if p["T"][0] == p["T"][2]]
    assert fixed == [(1, 1, 1), (32, 32, 32), (1056, 1056, 1056)]
    assert all(p["L"][2] + p["T"][2] <= 16384 for p in profs)
    assert profile_for(profs, 1056, 16384 - 1056) is not None and profile_for(profs, 1056, 16384) is None


def test_cache_key_changes_with_every_input():
    base = dict(flavour="tensorrt", source_sha256="a" * 64, precision="float16",
                targets=["NVIDIA H100 80GB HBM3", "9.0"], version="10.13.0", profs=profiles(32, 4096))
    key = cache_key(**base)
    assert key == cache_key(**dict(base))
    changes = dict(flavour="tensorrt-rtx", source_sha256="b" * 64, precision="int4",
                   targets=["NVIDIA GeForce RTX 4090", "8.9"], version="10.14.1", profs=profiles(32, 8192))
    for field, value in changes.items():
        assert cache_key(**{**base, field: value}) != key, field


@pytest.mark.tensorrt
def test_build_and_run_engine(tiny_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on CI (platform.md)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    import edge_dlm
    from edge_dlm.export.tensorrt import export_engine

    export_engine(tiny_ckpt, tmp_path / "trt", dtype="float32", max_prefill=64, log=lambda *_: None)
    trt_rt = edge_dlm.load(tmp_path / "trt", device="cuda")
    ref = edge_dlm.load(tiny_ckpt, device="cuda", dtype="float32")
    assert trt_rt.engine == "tensorrt"
    for mode in ("ar", "linear-spec", "quadratic-spec", "diffusion"):
        assert trt_rt.generate([1, 40, 41], mode=mode, max_new_tokens=12).output_ids == \
            ref.generate([1, 40, 41], mode=mode, max_new_tokens=12).output_ids


def test_dataclass_free_profiles_are_json():  # the manifest stores them as they are
    import json

    assert json.loads(json.dumps(profiles(4, 64))) == [
        {k: list(v) for k, v in p.items()} for p in profiles(4, 64)]
    assert not dataclasses.is_dataclass(profiles(4, 64)[0])
