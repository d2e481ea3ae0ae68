"""Bad input around engines and exports: one line, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from edge_dlm import cli
from edge_dlm.engines.trt_engine import check_artifact


def one_line_error(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def fake_trt_artifact(src, path, plan_bytes=b"\x00plan" * 100, gpu="NVIDIA H100 80GB HBM3", version="10.13.0"):
    from edge_dlm.export.manifest import file_sha256

    shutil.copytree(src, path)
    plan = path / "engine-0123456789abcdef.plan"
    plan.write_bytes(plan_bytes)
    (path / "manifest.json").write_text(json.dumps({"format_version": 1, "dtype": "float16", "tensorrt": {
        "engine": plan.name, "engine_sha256": file_sha256(plan), "gpu": gpu, "version": version,
        "compute_capability": "9.0", "profiles": []}}))
    return plan


def test_truncated_or_corrupt_engine(tiny_ckpt, tmp_path, capsys):
    art = tmp_path / "trt"
    plan = fake_trt_artifact(tiny_ckpt, art)
    assert check_artifact(art, None, None) == []
    plan.write_bytes(plan.read_bytes()[:-7])  # truncated
    assert "corrupt or truncated" in check_artifact(art, None, None)[0]
    assert cli.main(["generate", "--model", str(art), "--engine", "tensorrt", "--prompt", "x"]) == 2
    one_line_error(capsys, "corrupt or truncated")


def test_engine_from_another_gpu_or_tensorrt(tiny_ckpt, tmp_path):
    art = tmp_path / "trt"
    fake_trt_artifact(tiny_ckpt, art)
    h100 = ("NVIDIA H100 80GB HBM3", "9.0")
    assert check_artifact(art, h100, "10.13.0") == []
    [gpu] = check_artifact(art, ("NVIDIA GeForce RTX 4090", "8.9"), "10.13.0")
    assert "built for NVIDIA H100 80GB HBM3, this GPU is NVIDIA GeForce RTX 4090; rebuild" in gpu
    [ver] = check_artifact(art, h100, "10.14.1")
    assert "TensorRT 10.13.0, installed is 10.14.1" in ver


def test_target_not_installed(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert cli.main(["export", str(tiny_ckpt), "-o", str(tmp_path / "t"), "--target", "tensorrt"]) == 2
    one_line_error(capsys, "needs TensorRT, which is not installed")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["export", str(tiny_ckpt), "-o", str(tmp_path / "o"), "--target", "onnx"]) == 2
    one_line_error(capsys, "needs onnxruntime")
    assert cli.main(["generate", "--model", str(tiny_ckpt), "--engine", "onnxruntime", "--prompt", "x"]) == 2
    one_line_error(capsys, "onnxruntime is not installed")
    assert cli.main(["export", str(tiny_ckpt), "-o", str(tmp_path / "o"), "--target", "coreml"]) == 2
    one_line_error(capsys, "--target coreml not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_onnx_graph(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    art = tmp_path / "onnx"
    assert cli.main(["export", str(tiny_ckpt), "-o", str(art), "--target", "onnx"]) == 0
    graph = art / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(art), "--prompt", "x"]) == 2
    one_line_error(capsys, "cannot be loaded by onnxruntime")


def test_interrupted_onnx_export_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    import edge_dlm.export.onnx as ox

    def interrupted(*a, **k):
        (a[1]).write_bytes(b"partial")  # a half-written graph inside the temp directory
        raise KeyboardInterrupt

    monkeypatch.setattr(ox, "export_graph", interrupted)
    assert cli.main(["export", str(tiny_ckpt), "-o", str(tmp_path / "out"), "--target", "onnx"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_unknown_engine_and_quant_with_exported_engine(tiny_ckpt, capsys):
    assert cli.main(["generate", "--model", str(tiny_ckpt), "--engine", "vulkan", "--prompt", "x"]) == 2
    one_line_error(capsys, "engine 'vulkan' not supported; known: auto, tensorrt, tensorrt-rtx, onnxruntime, torch")


def test_doctor_explains_every_engine(tiny_ckpt, capsys):
    assert cli.main(["doctor", "--model", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "--engine auto loads: torch" in out and "the engine rule: --engine auto runs an artifact" in out
    assert "tensorrt" in out and "has no TensorRT engine" in out
    assert "Triton kernels on" in out and "quantization int8/int4 (torch): ok" in out
