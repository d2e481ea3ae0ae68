"""The CLI: bad input gives one line and exit code 2; --json reports the contract's fields."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_dlm.cli import main

EXE = [sys.executable, "-m", "edge_dlm.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_generate_json_reports_contract_fields(tiny_ckpt, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "hello", "--json",
                 "--max-new-tokens", "12", "--mode", "linear-spec"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("text", "prompt_ids", "output_ids", "finish_reason", "mode", "nfe", "tpf", "elapsed_s",
                "tokens_per_s", "mean_accepted"):
        assert key in out
    stream = len(out["output_ids"]) + (out["finish_reason"] == "stop")
    assert out["tpf"] == pytest.approx(stream / out["nfe"])
    assert out["mode"] == "linear-spec" and out["finish_reason"] in ("stop", "length")
    cycles = (out["nfe"] - 1) // 2
    assert out["mean_accepted"] == pytest.approx((stream - 1) / cycles)


def test_ar_json_has_no_mean_accepted(tiny_ckpt, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "hello", "--json", "--mode", "ar",
                 "--max-new-tokens", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "mean_accepted" not in out and out["nfe"] == len(out["output_ids"]) + (out["finish_reason"] == "stop")


def test_streams_text_without_json(tiny_ckpt, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "hi", "--max-new-tokens", "8",
                 "--mode", "diffusion", "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "[diffusion]" in captured.err and "NFE" in captured.err


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps must be in 1..4"),
    (["--steps", "5"], "--steps must be in 1..4"),
    (["--threshold", "1.5"], "--threshold must be in 0..1"),
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--mode", "beam"], "invalid choice"),
    (["--mode", "quadratic-spec", "--block-size", "80"], "too large for quadratic-spec"),
    (["--temperature", "-1"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_decode_flags(tiny_ckpt, args, needle):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "hi", *args), needle)


def test_missing_directory(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"),
                          "does not exist")


def test_missing_safetensors(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (d / "model.safetensors").unlink()
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "hi"), "model.safetensors")


def test_truncated_safetensors(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "hi"), "truncated")


def test_wrong_tensor_shape(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    state = load_file(d / "model.safetensors")
    state["encoder.layers.1.mlp.up_proj.weight"] = state["encoder.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(state, str(d / "model.safetensors"))
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "hi"),
                          "encoder.layers.1.mlp.up_proj.weight has shape")


def test_unknown_model_type(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "hi"), "model_type 'llama'")


def test_pickle_checkpoint_is_refused(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # a real pickle that would create a file if it were ever unpickled
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "hi"), "pickle")
    assert not marker.exists()


def test_empty_prompt(tiny_ckpt, tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "  "), "prompt is empty")
    f = tmp_path / "p.txt"
    f.write_text("")
    assert_one_line_error(run_cli("generate", "--model", str(tiny_ckpt), "--prompt-file", str(f)), "empty")


def test_prompt_longer_than_context(tmp_path):
    from edge_dlm.model.testing import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path / "c", max_positions=32)
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "word " * 100, "--raw"),
                          "model context is 32")


def test_missing_prompt_file(tiny_ckpt, tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_ckpt), "--prompt-file",
                                  str(tmp_path / "none.txt")), "cannot read --prompt-file")


def test_import_and_help_stay_light():
    heavy = ("onnxruntime", "tensorrt", "triton", "textual", "transformers", "bitsandbytes")
    code = ("import sys, edge_dlm; from edge_dlm.cli import build_parser; build_parser().format_help(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    helped = run_cli("--help")
    assert helped.returncode == 0 and "generate" in helped.stdout


def test_an_eager_answer_never_imports_the_compiler():
    """Loading a model and answering eagerly (every mode, the controls, sampling) leaves torch's compiler
    stack unimported: it is 1 s of a process's start (a model built on the meta device once pulled it
    in through torch._refs) and only compiled passes need it."""
    code = ("import sys, edge_dlm\n"
            "rt = edge_dlm.load(device='cpu', compile='off')\n"
            "for m in ('ar', 'diffusion', 'linear-spec', 'quadratic-spec'):\n"
            "    rt.generate('hi', mode=m, max_new_tokens=8)\n"
            "rt.generate('hi', mode='ar', max_new_tokens=8, json_schema={'type': 'object'}, temperature=0.7, seed=1)\n"
            "print([m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
