"""`edge-dlm export --target gguf`: the checkpoint as llama.cpp reads it, read back with the `gguf`
package, and (where llama.cpp is installed) decoded by llama.cpp to edge-dlm's own AR logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_dlm import cli
from edge_dlm.hub import DEMO_MODEL
from edge_dlm.model.weights import load_model

gguf = pytest.importorskip("gguf")
from edge_dlm.export.gguf import permute_rope, read_back  # noqa: E402


def export(*args) -> int:
    return cli.main(["export", *map(str, args), "--target", "gguf"])


def dequant(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])


@pytest.mark.parametrize("quant,tol", [(None, 0.0), ("int8", 0.01), ("int4", 0.15)])
def test_demo_model_reads_back(tmp_path, quant, tol):
    out = tmp_path / "demo.gguf"
    assert export(DEMO_MODEL, "-o", out, *(["--quant", quant] if quant else ["--dtype", "float32"])) == 0
    back = read_back(out)
    meta, ts = back["meta"], back["tensors"]
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    rope = cfg["rope_parameters"]
    assert meta["general.architecture"] == "mistral3"
    expect = {"mistral3.block_count": cfg["num_hidden_layers"], "mistral3.embedding_length": cfg["hidden_size"],
              "mistral3.feed_forward_length": cfg["intermediate_size"], "mistral3.context_length": 2048,
              "mistral3.attention.head_count": 3, "mistral3.attention.head_count_kv": 1,
              "mistral3.rope.dimension_count": 64, "mistral3.rope.scaling.type": "yarn",
              "mistral3.rope.scaling.original_context_length": rope["original_max_position_embeddings"],
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert {k: meta[k] for k in expect} == expect
    for key, value in (("rope.freq_base", rope["rope_theta"]), ("rope.scaling.factor", rope["factor"]),
                       ("rope.scaling.yarn_beta_fast", rope["beta_fast"]),
                       ("attention.temperature_scale", rope["llama_4_scaling_beta"])):
        assert meta[f"mistral3.{key}"] == pytest.approx(value)
    assert meta["tokenizer.chat_template"].startswith("{{ bos_token }}")
    tokens = back["reader"].fields["tokenizer.ggml.tokens"]
    vocab = json.loads((DEMO_MODEL / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tokens.data) == cfg["vocab_size"]
    assert all(bytes(tokens.parts[tokens.data[i]]).decode() == text for text, i in list(vocab.items())[::97])
    assert len(ts) == 3 + 9 * cfg["num_hidden_layers"]

    model = load_model(DEMO_MODEL)
    layer = model.encoder.layers[1]
    pairs = {"token_embd.weight": model.encoder.embed_tokens.weight, "output.weight": model.diffusion_head.weight,
             "blk.1.attn_q.weight": permute_rope(layer.self_attn.q_proj.weight, 3),
             "blk.1.attn_k.weight": permute_rope(layer.self_attn.k_proj.weight, 1),
             "blk.1.ffn_down.weight": layer.mlp.down_proj.weight, "blk.1.ffn_norm.weight":
             layer.post_attention_layernorm.weight}
    for name, want in pairs.items():
        got = torch.from_numpy(dequant(ts[name]).astype(np.float32))
        want = want.detach().float()
        assert got.shape == want.shape, name
        err = (got - want).abs().max() / want.abs().max()
        assert err <= tol, (name, float(err))
        if want.dim() == 1:
            assert ts[name].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay float
    kind = {None: "F32", "int8": "Q8_0", "int4": "Q4_0"}[quant]
    assert ts["blk.0.attn_v.weight"].tensor_type.name == kind


def test_rope_permutation_is_the_interleaving():
    """Row pair (i, i + d/2) of a head becomes rows (2i, 2i + 1): rotate-half -> interleaved."""
    w = torch.arange(2 * 8, dtype=torch.float32)[:, None].expand(16, 3)  # 2 heads of 8 rows
    got = permute_rope(w, 2)[:, 0].tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_refusals_are_one_line(tmp_path, tiny_ckpt, capsys):
    def fails(*args) -> str:
        capsys.readouterr()
        assert export(*args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    assert "NAME.gguf" in fails(tiny_ckpt, "-o", tmp_path / "x.bin")
    assert "Q8_0" in fails(tiny_ckpt, "-o", tmp_path / "x.gguf", "--quant", "nf4")
    assert "--group-size" in fails(tiny_ckpt, "-o", tmp_path / "x.gguf", "--quant", "int4", "--group-size", "128")
    (tmp_path / "there.gguf").write_bytes(b"keep")
    assert "--force" in fails(tiny_ckpt, "-o", tmp_path / "there.gguf")
    assert (tmp_path / "there.gguf").read_bytes() == b"keep"
    odd = tmp_path / "odd"
    shutil.copytree(tiny_ckpt, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["rope_parameters"]["mscale"] = 2.0
    (odd / "config.json").write_text(json.dumps(cfg))
    err = fails(odd, "-o", tmp_path / "odd.gguf")
    assert "mscale" in err
    assert not list(tmp_path.glob("*.gguf.*")) and not (tmp_path / "odd.gguf").exists()  # no partial file


def test_llama_cpp_decodes_it_as_edge_dlm_does(tiny_ckpt, tmp_path):
    """llama.cpp's logits for a 48-token sequence equal edge-dlm's (fp32 weights); the tiny checkpoint
    has YaRN and the Llama-4 query scale active past 16 positions, so both are exercised."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "tiny.gguf"
    assert export(tiny_ckpt, "-o", out, "--dtype", "float32") == 0
    script = f"""
import json, sys, numpy as np
from llama_cpp import Llama
ids = json.loads(sys.argv[1])
llm = Llama(model_path={str(out)!r}, n_ctx=128, n_threads=1, verbose=False, logits_all=True)
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[:len(ids)]).tolist()))
"""
    ids = [1] + [int(x) for x in torch.randint(6, 300, (47,), generator=torch.Generator().manual_seed(3))]
    run = subprocess.run([sys.executable, "-c", script, json.dumps(ids)], capture_output=True, text=True, check=True)
    theirs = torch.tensor(json.loads(run.stdout.splitlines()[-1]))
    model = load_model(tiny_ckpt)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=1e-3)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()


@pytest.mark.parametrize("code", [28, 122, 30, 5])  # ENOSPC, EDQUOT, EROFS, EIO
def test_a_failing_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, code):
    """A write that fails mid-export (a full disk, a quota, a read-only or failing device): exit 2 with
    one line, no partial file, the previous artifact at the path intact."""
    out = tmp_path / "demo.gguf"
    out.write_bytes(b"the previous artifact")

    def failing(self, *a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    assert export(DEMO_MODEL, "-o", out, "--force") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a write failed" in err[0] and os.strerror(code) in err[0]
    assert out.read_bytes() == b"the previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.gguf"]


def test_a_killed_exports_temporary_file_is_removed_by_the_next(tmp_path):
    """The export writes `.NAME.tmp-PID-*` beside the file; a kill (the OOM killer) leaves it, and the
    next export to that path removes it when its process is gone (a live one's is left alone)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".demo.gguf.tmp-{dead}-x1y2"
    stale.write_bytes(b"")
    live = tmp_path / f".demo.gguf.tmp-{os.getpid()}-busy"
    live.write_bytes(b"")
    assert export(DEMO_MODEL, "-o", tmp_path / "demo.gguf") == 0
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "demo.gguf", "demo.Modelfile"])


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    """The file's size is known from the headers before a byte is written: a folder with less room is
    one line naming both numbers, and nothing is written."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    assert export(DEMO_MODEL, "-o", tmp_path / "demo.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GiB free" in err and "needs about" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("quant,bits", [("int8", 8), ("int4", 4)])
def test_quantized_blocks_hold_edge_dlms_own_weights(tmp_path, quant, bits):
    """Q8_0 / Q4_0 blocks, dequantized by the gguf package (llama.cpp's own reader), are bit for bit the
    weights edge-dlm's int8 / int4 at group size 32 multiplies by."""
    from edge_dlm.model.quant import dequantize, quantize

    out = tmp_path / "q.gguf"
    assert export(DEMO_MODEL, "-o", out, "--quant", quant) == 0
    ts = read_back(out)["tensors"]
    model = load_model(DEMO_MODEL)
    layer = model.encoder.layers[0]
    for name, w in (("blk.0.attn_q.weight", permute_rope(layer.self_attn.q_proj.weight, 3)),
                    ("blk.0.ffn_down.weight", layer.mlp.down_proj.weight),
                    ("output.weight", model.diffusion_head.weight)):
        q = quantize(w, bits, 32, symmetric=True)
        ours = dequantize(q["qweight"], q["scales"], None, bits)
        theirs = torch.from_numpy(dequant(ts[name]).astype(np.float32))
        assert torch.equal(theirs, ours), name


@pytest.mark.parametrize("change,word", [
    (lambda t: t.update(normalizer={"type": "NFC"}), "normalizes"),
    (lambda t: t["pre_tokenizer"].update(add_prefix_space=True), "prefix space"),
    (lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}| ?\p{L}+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}), "no pre-tokenizer"),
    (lambda t: t.update(pre_tokenizer={"type": "Whitespace"}), "byte-level"),
])
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, capsys, change, word):
    """Never a silent approximation: a normalizer, a prefix space, a split regex llama.cpp has no type
    for, or no byte-level step is one line, and no file."""
    src = tmp_path / "ckpt"
    shutil.copytree(DEMO_MODEL, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    change(tok)
    (src / "tokenizer.json").write_text(json.dumps(tok))
    capsys.readouterr()
    assert export(src, "-o", tmp_path / "x.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and word in err, err
    assert not (tmp_path / "x.gguf").exists()
