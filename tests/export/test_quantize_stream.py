"""The quantized export streams (one source tensor in memory at a time) and writes exactly what
quantizing the loaded model writes; its safetensors writer is read back by safetensors itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from edge_dlm import cli
from edge_dlm.export.quantize import _source_dtype, write_safetensors
from edge_dlm.model.formats import ct_tensors
from edge_dlm.model.quant import QuantLinear, QuantSpec
from edge_dlm.model.quantize import quantize_model, quantized_state
from edge_dlm.model.weights import load_model


def read_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def in_memory(src, spec: QuantSpec, fmt: str) -> dict[str, torch.Tensor]:
    """What the whole-model path writes: the model loaded in its own dtype, quantized in place."""
    model = load_model(src, dtype=_source_dtype(src), lora=False)
    quantize_model(model, spec)
    if fmt == "edge-dlm":
        return quantized_state(model, spec)
    state = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        state |= ct_tensors(name, m)
    return state | {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in quantized}


@pytest.mark.parametrize("args, spec, fmt", [
    (["--quant", "int8"], QuantSpec("int8"), "edge-dlm"),
    (["--quant", "int4", "--group-size", "32", "--asymmetric"], QuantSpec("int4", 32, symmetric=False), "edge-dlm"),
    (["--quant", "int4", "--keep-head"], QuantSpec("int4", head=False), "edge-dlm"),
    (["--quant", "int4", "--format", "compressed-tensors"], QuantSpec("int4", embedding=False), "compressed-tensors"),
])
def test_streamed_export_writes_what_the_loaded_model_would(tiny_ckpt, tmp_path, args, spec, fmt):
    out = tmp_path / "q"
    assert cli.main(["export", str(tiny_ckpt), "-o", str(out), *args]) == 0
    got, want = read_all(out / "model.safetensors"), in_memory(tiny_ckpt, spec, fmt)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    cfg = json.loads((out / "config.json").read_text())
    if fmt == "compressed-tensors":
        assert cfg["quantization_config"]["ignore"] == []
    elif not spec.head:
        assert got["diffusion_head.weight"].dtype == _source_dtype(tiny_ckpt)  # kept float, as it was


def test_the_writer_round_trips_every_dtype_and_shape(tmp_path):
    tensors = {"a": torch.arange(7, dtype=torch.int8), "b": torch.randn(3, 5).to(torch.bfloat16),
               "c": torch.zeros(0, 4), "d": torch.tensor(3.5, dtype=torch.float16), "e": torch.ones(2, 3, dtype=torch.bool),
               "f": torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, ::2]}  # not contiguous
    path = tmp_path / "x.safetensors"
    size = write_safetensors(path, iter(tensors.items()), list(tensors), {"format": "pt"})
    assert size == path.stat().st_size
    back = read_all(path)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(RuntimeError, match="reserved"):  # names that do not cover the tensors: a bug, said
        write_safetensors(tmp_path / "y.safetensors", iter({"a" * 4000: torch.zeros(1)}.items()), ["a"], {})


def test_too_little_free_space_is_refused_before_any_work(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 10))
    assert cli.main(["export", str(tiny_ckpt), "-o", str(tmp_path / "q"), "--quant", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GiB free" in err and "quantized weights need" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32, symmetric=False),
                                  QuantSpec("int4", head=False, embedding=False)])
def test_quantize_on_load_streams_to_the_same_model(tiny_ckpt, spec):
    """`load(quant=...)` quantizes each weight as it is read: every buffer equals quantizing the loaded
    float model, and so does the answer."""
    import edge_dlm

    whole = quantize_model(load_model(tiny_ckpt), spec)
    streamed = load_model(tiny_ckpt, quantize=spec)
    a, b = whole.state_dict(), streamed.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert [type(m).__name__ for m in whole.modules()] == [type(m).__name__ for m in streamed.modules()]
    rt = edge_dlm.load(tiny_ckpt, device="cpu", quant=spec.scheme, group_size=spec.group_size)
    assert rt.generate("hello", mode="ar", max_new_tokens=6).output_ids


def test_quantize_on_load_of_a_quantized_artifact_is_refused(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["export", str(tiny_ckpt), "-o", str(out), "--quant", "int8"]) == 0
    assert cli.main(["generate", "--model", str(out), "--quant", "int4", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0]
