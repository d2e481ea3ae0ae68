"""`edge-dlm export --quant`: artifacts that load directly, and bad input that leaves nothing behind."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from edge_dlm import cli
from edge_dlm.primitives.attention import BLOCK
from edge_dlm.model.quant import QuantSpec
from edge_dlm.model.quantize import quantize_model
from edge_dlm.model.weights import load_model
from helpers import run_mode


def export(*args: str) -> int:
    return cli.main(["export", *map(str, args)])


def test_exported_artifact_equals_quantize_on_load(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "q4"
    assert export(tiny_ckpt, "-o", out, "--quant", "int4", "--group-size", "32", "--asymmetric") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": "int4", "group_size": 32, "symmetric": False,
                                        "head": True, "embedding": True}
    assert len(manifest["source_sha256"]) == 64 and "torch" in manifest["tool_versions"]
    assert manifest["weight_bytes"]["quantized"] < 0.2 * manifest["weight_bytes"]["source"]
    assert (out / "tokenizer.json").exists() and (out / "linear_spec_lora" / "adapter_config.json").exists()
    loaded = load_model(out)
    on_load = quantize_model(load_model(tiny_ckpt), QuantSpec("int4", group_size=32, symmetric=False))
    x, pos = torch.tensor([[1, 5, 9, 13, 17]]), torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(loaded(x, pos, mask=BLOCK.new_mask(5)), on_load(x, pos, mask=BLOCK.new_mask(5)))
    ar, _ = run_mode(loaded, [1, 40, 41, 42], "ar", max_new_tokens=12)
    ls, _ = run_mode(loaded, [1, 40, 41, 42], "linear-spec", max_new_tokens=12)
    assert ls.output_ids == ar.output_ids
    assert cli.main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "4",
                     "--device", "cpu", "--json"]) == 0  # auto: calibrates the artifact on torch only
    out_json = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out_json["mode"] in ("ar", "linear-spec", "quadratic-spec")


def test_nf4_artifact_roundtrip(tiny_ckpt, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4"
    assert export(tiny_ckpt, "-o", out, "--quant", "nf4", "--keep-head") == 0
    model = load_model(out)
    assert type(model.diffusion_head).__name__ == "Linear"  # --keep-head
    assert type(model.encoder.layers[0].mlp.up_proj).__name__ == "NF4Linear"
    ar, _ = run_mode(model, [1, 40, 41, 42], "ar", max_new_tokens=8)
    qs, _ = run_mode(model, [1, 40, 41, 42], "quadratic-spec", max_new_tokens=8)
    assert qs.output_ids == ar.output_ids


def one_line_error(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("args,match", [
    (["--quant", "int4", "--group-size", "48"], "group size 48 not supported"),
    (["--quant", "int3"], "--quant int3 not supported"),
    (["--quant", "llm-int8"], "load-time option"),
    ([], "nothing to export"),
])
def test_bad_export_options(tiny_ckpt, tmp_path, capsys, args, match):
    assert export(tiny_ckpt, "-o", tmp_path / "out", *args) == 2
    one_line_error(capsys, match)
    assert leftovers(tmp_path) == []


def test_requantizing_and_existing_output_are_refused(tiny_ckpt, tmp_path, capsys):
    first = tmp_path / "q8"
    assert export(tiny_ckpt, "-o", first, "--quant", "int8") == 0
    capsys.readouterr()
    assert export(first, "-o", tmp_path / "again", "--quant", "int4") == 2
    one_line_error(capsys, "already quantized")
    before = (first / "model.safetensors").stat().st_mtime_ns
    assert export(tiny_ckpt, "-o", first, "--quant", "int4") == 2
    one_line_error(capsys, "already exists; pass --force")
    assert (first / "model.safetensors").stat().st_mtime_ns == before
    assert export(tiny_ckpt, "-o", first, "--quant", "int4", "--force") == 0
    assert json.loads((first / "config.json").read_text())["quantization"]["scheme"] == "int4"
    assert leftovers(tmp_path) == ["q8"]  # no temp or backup directories left
    assert cli.main(["generate", "--model", str(first), "--quant", "int8", "--prompt", "x"]) == 2
    one_line_error(capsys, "already quantized")


def test_nf4_without_bitsandbytes(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    assert export(tiny_ckpt, "-o", tmp_path / "nf4", "--quant", "nf4") == 2
    one_line_error(capsys, "need bitsandbytes")
    assert cli.main(["generate", "--model", str(tiny_ckpt), "--quant", "nf4", "--prompt", "x"]) == 2
    one_line_error(capsys, "need bitsandbytes")
    assert leftovers(tmp_path) == []


def test_interrupted_export_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import edge_dlm.export.quantize as q

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "copy_side_files", boom)  # after the weights are written
    assert export(tiny_ckpt, "-o", tmp_path / "out", "--quant", "int8") == 130
    assert leftovers(tmp_path) == []
