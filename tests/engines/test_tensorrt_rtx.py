"""TensorRT for RTX: real engines of the demo model, built on this (GPU-less) machine.

The builder runs ahead of time without a GPU, so CI builds the demo model's fp16 and int4 engines
for real and checks everything short of running them: the parser's verdict, the profiles against
every pass the four modes run, the manifest, the library's own header check, and the one-line errors.
Running an engine needs an Ampere / Ada / Blackwell RTX GPU (`test_engine_decodes_like_torch`).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

trt = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (the test extra installs it)")
pytest.importorskip("onnxruntime", reason="needs the onnx extra")
pytest.importorskip("onnxscript", reason="needs the onnx extra")

import onnx  # noqa: E402

from edge_dlm import cli  # noqa: E402
from edge_dlm.engines import trt_engine  # noqa: E402
from edge_dlm.export.manifest import file_sha256  # noqa: E402
from edge_dlm.export.onnx import GRAPH_FILE  # noqa: E402
from edge_dlm.export.tensorrt import (RTX_DEFAULT_TARGETS, TENSORRT_RTX, export_engine, profile_for,  # noqa: E402
                                      profiles, unsupported_ops)
from edge_dlm.hub import DEMO_MODEL  # noqa: E402
from edge_dlm.model.weights import load_model  # noqa: E402
from helpers import run_mode  # noqa: E402

PRECISIONS = {"float16": {"dtype": "float16"}, "int4": {"dtype": "float16", "quant": "int4"}}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """precision -> artifact directory, both built from the bundled demo model."""
    root = tmp_path_factory.mktemp("rtx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))  # the timing cache stays out of the user's
        for name, kw in PRECISIONS.items():
            export_engine(DEMO_MODEL, root / name, target="tensorrt-rtx", log=lambda *_: None, **kw)
    return {name: root / name for name in PRECISIONS}


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_manifest_describes_the_engine(engines, precision):
    art = engines[precision]
    m = manifest(art)
    info = m["tensorrt-rtx"]
    plan = art / info["engine"]
    assert m["kind"] == "tensorrt-rtx" and m["precision"] == precision and m["dtype"] == "float16"
    assert info["version"] == trt.__version__ and info["compute_capabilities"] == list(RTX_DEFAULT_TARGETS)
    assert info["engine_sha256"] == file_sha256(plan) and info["engine_bytes"] == plan.stat().st_size > 1_000_000
    cfg = load_model(DEMO_MODEL).config
    assert info["profiles"] == json.loads(json.dumps(profiles(cfg.block_size, cfg.max_position_embeddings)))
    assert (m["quantization"] or {}).get("scheme") == PRECISIONS[precision].get("quant")
    assert not (art / "linear_spec_lora").exists() and (art / "tokenizer.json").exists()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parser_takes_every_node(engines, precision):
    path = engines[precision] / GRAPH_FILE
    graph = onnx.load(str(path))
    assert unsupported_ops(graph) == []
    ops = {n.op_type for n in graph.graph.node}
    assert ("DequantizeLinear" in ops) == (precision == "int4") and "Reciprocal" not in ops
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    assert parser.num_errors == 0
    assert [network.get_output(i).name for i in range(network.num_outputs)] == ["logits", "new_keys", "new_values"]


def test_profiles_cover_every_pass_of_the_modes_on_the_demo_model(engines):
    model = load_model(DEMO_MODEL)
    profs = manifest(engines["float16"])["tensorrt-rtx"]["profiles"]
    passes = []

    class Recorder:  # the engine contract, recording (T, cached) for each pass
        config = model.config

        def new_cache(self, n):
            return model.new_cache(n)

        def __call__(self, tokens, positions, *, cache, attn, use_lora=False, last_only=False):
            passes.append((tokens.shape[1], cache.length))
            return model(tokens, positions, cache=cache, attn=attn, use_lora=use_lora, last_only=last_only)

    from edge_dlm.primitives.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(DEMO_MODEL).encode_prompt("Write a Python function is_even(n).")
    for mode, kw in [("ar", {}), ("diffusion", {"steps": 4}), ("linear-spec", {}), ("quadratic-spec", {})]:
        run_mode(Recorder(), ids, mode, max_new_tokens=40, **kw)
    b = model.config.block_size
    assert {t for t, _ in passes} >= {1, b, b * (b + 1), len(ids), len(ids) + b}
    for t, cached in passes:
        assert profile_for(profs, t, cached) is not None, (t, cached)
    ctx = model.config.max_position_embeddings
    assert profile_for(profs, b * (b + 1), ctx - b * (b + 1)) is not None  # the longest conversation too


def test_library_header_check(engines, tmp_path):
    plan = engines["int4"] / manifest(engines["int4"])["tensorrt-rtx"]["engine"]
    assert trt_engine.plan_diagnostics(trt, plan) == []  # well formed (the GPU checks need a GPU)
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\0" * 64 + plan.read_bytes()[64:])
    [why] = trt_engine.plan_diagnostics(trt, bad)
    assert "not a valid TensorRT for RTX engine" in why


def test_artifact_graph_computes_the_model(engines):
    """The graph handed to the builder (fp16, Div rewrite, int4 QDQ) runs in onnxruntime and matches torch."""
    from edge_dlm.primitives.attention import CAUSAL
    from edge_dlm.engines.ort_engine import OrtEngine

    ids = torch.tensor([[1, 30, 31, 32, 33, 34, 35, 36]])
    pos = torch.arange(8)[None]
    ref_model = load_model(DEMO_MODEL)
    with torch.inference_mode():
        ref = ref_model(ids, pos, cache=ref_model.new_cache(8), attn=CAUSAL)[0].float()
    for precision, tol in (("float16", 0.01), ("int4", 0.1)):
        eng = OrtEngine(engines[precision], torch.device("cpu"))
        got = eng(ids, pos, cache=eng.new_cache(8), attn=CAUSAL)[0].float()
        assert ((got - ref).norm() / ref.norm()).item() < tol, precision


def test_availability_here_and_on_other_gpus(engines, tmp_path):
    art = engines["float16"]
    [why] = trt_engine.availability(art, "cuda", TENSORRT_RTX)
    assert why.startswith("TensorRT for RTX engines run on an NVIDIA GPU")  # this machine has none
    version = trt.__version__
    assert trt_engine.check_artifact(art, ("NVIDIA GeForce RTX 4090", "8.9"), version, TENSORRT_RTX) == []
    [hopper] = trt_engine.check_artifact(art, ("NVIDIA H100 80GB HBM3", "9.0"), version, TENSORRT_RTX)
    assert "Hopper GPU (compute capability 9.0), which TensorRT for RTX does not support" in hopper
    [turing] = trt_engine.check_artifact(art, ("NVIDIA GeForce RTX 2080", "7.5"), version, TENSORRT_RTX)
    assert "this GPU (NVIDIA GeForce RTX 2080) is 7.5; rebuild it with --compute-capability 7.5" in turing


def one_line_error(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def test_engine_from_another_version(engines, tmp_path, capsys):
    art = tmp_path / "old"
    shutil.copytree(engines["float16"], art)
    m = manifest(art)
    m["tensorrt-rtx"]["version"] = "1.5.0.0"
    (art / "manifest.json").write_text(json.dumps(m))
    assert cli.main(["generate", "--model", str(art), "--engine", "tensorrt-rtx", "--prompt", "x"]) == 2
    one_line_error(capsys, f"built with TensorRT for RTX 1.5.0.0, installed is {trt.__version__}; rebuild it")


def test_truncated_engine(engines, tmp_path, capsys):
    art = tmp_path / "cut"
    shutil.copytree(engines["int4"], art)
    plan = art / manifest(art)["tensorrt-rtx"]["engine"]
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    assert cli.main(["generate", "--model", str(art), "--engine", "tensorrt-rtx", "--prompt", "x"]) == 2
    one_line_error(capsys, "is corrupt or truncated (checksum mismatch); rebuild it with --force")
    assert cli.main(["doctor", "--model", str(art)]) == 0
    assert "corrupt or truncated" in capsys.readouterr().out


def test_bad_export_requests(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x"
    cases = [(["--compute-capability", "9.0"], "9.0 (Hopper: H100, H200) is not supported by TensorRT for RTX"),
             (["--compute-capability", "8.6,7.0"], "--compute-capability 7.0 not supported by TensorRT for RTX"),
             (["--compute-capability", "7.5", "--quant", "int4"], "7.5 (Turing) takes float16 engines only"),
             (["--dtype", "bfloat16", "--quant", "int8"], "built over a float16 graph"),
             (["--quant", "nf4"], "tensorrt-rtx takes int8 or int4 weight-only quantization, not nf4"),
             (["--dtype", "float8"], "--dtype float8 not supported for tensorrt-rtx")]
    for extra, match in cases:
        assert cli.main(["export", str(DEMO_MODEL), "-o", str(out), "--target", "tensorrt-rtx", *extra]) == 2, extra
        one_line_error(capsys, match)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    assert cli.main(["export", str(DEMO_MODEL), "-o", str(out), "--target", "tensorrt-rtx"]) == 2
    one_line_error(capsys, "--target tensorrt-rtx needs TensorRT for RTX, which is not installed: "
                           ".venv/bin/pip install -e '.[tensorrt-rtx]' in the edge-dlm clone")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_engine_decodes_like_torch(engines):
    gpu = trt_engine.gpu_identity()
    if gpu is None:
        pytest.skip("running a TensorRT for RTX engine needs an NVIDIA GPU")
    if gpu[1] not in RTX_DEFAULT_TARGETS:
        pytest.skip(f"TensorRT for RTX does not run on {gpu[0]} (compute capability {gpu[1]})")
    import edge_dlm

    rt = edge_dlm.load(engines["float16"], device="cuda", engine="tensorrt-rtx")
    ref = edge_dlm.load(DEMO_MODEL, device="cuda", dtype="float16")
    for mode in ("ar", "linear-spec", "quadratic-spec", "diffusion"):
        assert rt.generate("def add(a, b):", raw=True, mode=mode, max_new_tokens=24).output_ids == \
            ref.generate("def add(a, b):", raw=True, mode=mode, max_new_tokens=24).output_ids, mode


def test_onnxruntime_declines_a_bfloat16_graph(engines, tmp_path):
    from edge_dlm.engines.ort_engine import availability

    art = tmp_path / "bf16"
    shutil.copytree(engines["float16"], art)
    assert availability(art, "cpu") == []
    m = manifest(art)
    (art / "manifest.json").write_text(json.dumps({**m, "dtype": "bfloat16"}))
    assert availability(art, "cpu") == ["its graph is bfloat16, which onnxruntime does not run here "
                                        "(float32 and float16 only)"]
