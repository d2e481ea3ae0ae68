"""Calibrated int4 / int8 (`--quant int4 --calibrate`): AWQ's scale and clip search before quantizing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from edge_dlm.model import awq
from edge_dlm.cli import main
from edge_dlm.model.quant import QuantSpec, linear_ref
from edge_dlm.model.quantize import quantize_model
from edge_dlm.hub import DEMO_MODEL
from edge_dlm.primitives.tokenizer import Tokenizer
from edge_dlm.model.weights import load_model
from helpers import run_mode


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL), Tokenizer.from_dir(DEMO_MODEL)


def logits(model, tokens):
    with torch.no_grad():  # the reference matmuls: no backend gave these layers a kernel
        return model(tokens, torch.arange(tokens.shape[1])[None])


def test_calibration_tokens_are_the_bundled_prompts(demo):
    _, tok = demo
    ids = awq.calibration_tokens(tok)
    assert ids.shape[0] == 1 and 300 <= ids.shape[1] <= awq.MAX_TOKENS  # a few hundred tokens


def test_rescaling_keeps_the_float_function(demo, monkeypatch):
    """Scales folded into the norms / up_proj: with clipping off, before quantizing, the model
    computes the same logits."""
    model, tok = demo
    monkeypatch.setattr(awq, "CLIPS", [1.0])
    spec = QuantSpec("int4", 64, calibration="awq")
    cal = copy.deepcopy(model)
    awq.calibrate(cal, spec, awq.calibration_tokens(tok))
    x = torch.tensor([[1, 100, 200, 300, 400, 500, 600, 700]])
    torch.testing.assert_close(logits(cal, x), logits(model, x), atol=2e-3, rtol=1e-3)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dict(cal.named_parameters())[n])]
    assert any("layernorm" in n for n in moved) and any("q_proj" in n for n in moved)


def test_calibrated_int4_has_less_output_error(demo):
    """On held-out text (not the calibration prompts), calibrated int4 logits are closer to float."""
    model, tok = demo
    held = torch.tensor([tok.encode("import os\n\ndef walk(top):\n    for root, dirs, files in os.walk(top):\n"
                                    "        yield root\n\nclass Stack:\n    def __init__(self):\n")])
    ref = logits(model, held)
    errs = {}
    for cal in (None, "awq"):
        q = quantize_model(copy.deepcopy(model), QuantSpec("int4", 64, calibration=cal), tok)
        errs[cal] = ((logits(q, held) - ref).norm() / ref.norm()).item()
    assert errs["awq"] < errs[None] * 0.97, errs


def test_search_clip_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    w[:, 5] *= 20  # an outlier column
    x = torch.randn(64, 128, generator=g)
    spec = QuantSpec("int4", 32)
    err = lambda v: (x @ (w - awq._qdq(v, spec)).t()).pow(2).sum()  # noqa: E731
    clipped = awq.search_clip(x, w, spec)
    assert err(clipped) <= err(w) and (clipped.abs() <= w.abs() + 1e-6).all()


def test_calibrated_spec_is_recorded_and_lossless(tiny_model, tiny_ckpt):
    spec = QuantSpec("int4", 32, calibration="awq")
    assert spec.to_dict()["calibration"] == "awq" and "calibration" not in QuantSpec("int4").to_dict()
    q = quantize_model(copy.deepcopy(tiny_model), spec, Tokenizer.from_dir(tiny_ckpt))
    prompt = [1, 40, 41, 42, 43, 44]
    ar, _ = run_mode(q, prompt, "ar", max_new_tokens=16)
    for mode in ("linear-spec", "quadratic-spec"):
        assert run_mode(q, prompt, mode, max_new_tokens=16)[0].output_ids == ar.output_ids


def test_export_calibrated_artifact(tmp_path, capsys):
    out = tmp_path / "int4-awq"
    assert main(["export", str(DEMO_MODEL), "-o", str(out), "--quant", "int4", "--calibrate"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["calibration"] == "awq" and cfg["quantization"]["scheme"] == "int4"
    assert main(["generate", "--model", str(out), "--mode", "ar", "--max-new-tokens", "4", "--prompt", "def f("]) == 0


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--calibrate", "--mode", "ar", "--prompt", "x"], "--quant"),
    (["generate", "--quant", "nf4", "--calibrate", "--mode", "ar", "--prompt", "x"], "int4 and int8"),
    (["export", str(DEMO_MODEL), "-o", "OUT", "--target", "onnx", "--quant", "int4", "--calibrate"], "--target torch"),
])
def test_bad_calibrate_flags(argv, needle, capsys, tmp_path):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
