"""Malformed checkpoints: each is refused with one line and exit code 2, before use, reading nothing
outside its directory (every file opened is recorded: Python opens through an audit hook, and the
safetensors / tokenizers readers, which open files natively, through wrappers)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors
import tokenizers
import torch
from safetensors.torch import load_file, save_file

from edge_dlm import cli

OPENED: list[str] | None = None


def _audit(event, args):
    if OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while OPENED is a list


# ---- ways to break a checkpoint (each takes the copy's directory and the "outside" directory) -------

def cfg(**changes):
    def edit(d: Path, outside: Path) -> None:
        c = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        (d / "config.json").write_text(json.dumps(c))
    return edit


def tensor(name: str, fn):
    def edit(d: Path, outside: Path) -> None:
        state = load_file(d / "model.safetensors")
        state[name] = fn(state[name])
        save_file(state, str(d / "model.safetensors"))
    return edit


def lora_tensor(fn):
    def edit(d: Path, outside: Path) -> None:
        f = d / "linear_spec_lora" / "adapter_model.safetensors"
        state = load_file(f)
        first = sorted(state)[0]
        state[first] = fn(state[first])
        save_file(state, str(f))
    return edit


def index(weight_map):
    """Replace the single file by a shard index naming `weight_map(names)`."""
    def edit(d: Path, outside: Path) -> None:
        names = list(load_file(d / "model.safetensors"))
        shutil.copy(d / "model.safetensors", outside / "model.safetensors")
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        wm = weight_map(names, outside)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return edit


def link(name: str):
    """Make `name` a symlink to an intact copy of it outside the model directory."""
    def edit(d: Path, outside: Path) -> None:
        target = outside / Path(name).name
        shutil.copy(d / name, target)
        (d / name).unlink()
        (d / name).symlink_to(target)
    return edit


def template(source):
    def edit(d: Path, outside: Path) -> None:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = source
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return edit


def write(name: str, data: bytes):
    def edit(d: Path, outside: Path) -> None:
        (d / name).write_bytes(data)
    return edit


def quantized_with_float_qweight(d: Path, outside: Path) -> None:
    from edge_dlm.export.quantize import export_quantized
    from edge_dlm.model.quant import QuantSpec

    q = outside / "q"
    export_quantized(d, q, QuantSpec("int8"), log=lambda *_: None)
    shutil.rmtree(d)
    shutil.copytree(q, d)
    shutil.rmtree(q)
    state = load_file(d / "model.safetensors")
    name = next(n for n in state if n.endswith(".qweight"))
    state[name] = state[name].float()
    save_file(state, str(d / "model.safetensors"))


def big_tokenizer(d: Path, outside: Path) -> None:
    c = json.loads((d / "config.json").read_text())
    tensor("encoder.embed_tokens.weight", lambda t: t[:300])(d, outside)
    tensor("diffusion_head.weight", lambda t: t[:300])(d, outside)
    c["vocab_size"] = 300
    (d / "config.json").write_text(json.dumps(c))


CASES = {
    "norm stored as int32": (tensor("encoder.norm.weight", lambda t: t.to(torch.int32)), "stored as I32, expected floating"),
    "q_proj stored as int8": (tensor("encoder.layers.0.self_attn.q_proj.weight", lambda t: t.to(torch.int8)), "stored as I8"),
    "bool weight": (tensor("encoder.layers.1.mlp.up_proj.weight", lambda t: t > 0), "stored as BOOL"),
    "NaN in a weight": (tensor("encoder.layers.0.mlp.down_proj.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))), "NaN or infinite"),
    "inf in a norm": (tensor("encoder.layers.1.input_layernorm.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))), "NaN or infinite"),
    "NaN in the LoRA drafter": (lora_tensor(lambda t: t * float("nan")), "NaN or infinite values"),
    "integer LoRA drafter": (lora_tensor(lambda t: t.to(torch.int16)), "a LoRA drafter is floating point"),
    "vocab_size 0": (cfg(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    "hidden_size negative": (cfg(hidden_size=-64), "hidden_size must be a positive integer"),
    "hidden_size as a string": (cfg(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
    "layers as a float": (cfg(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer"),
    "layers 0": (cfg(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    "intermediate_size 0": (cfg(intermediate_size=0), "intermediate_size must be a positive integer"),
    "kv heads not dividing heads": (cfg(num_key_value_heads=3), "multiple of num_key_value_heads"),
    "heads 0": (cfg(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    "hidden not divisible by heads (no head_dim)": (cfg(head_dim=None, hidden_size=66), "not divisible by num_attention_heads"),
    "odd head_dim": (cfg(head_dim=15), "head_dim must be even"),
    "head_dim inconsistent with tensors": (cfg(head_dim=8), "expected"),
    "block_size 0": (cfg(block_size=0), "block_size must be a positive integer"),
    "block_size beyond the context": (cfg(block_size=8192), "exceeds the context"),
    "mask id outside the vocabulary": (cfg(mask_token_id=100000), "mask_token_id 100000 is outside the vocabulary"),
    "negative eos id": (cfg(eos_token_id=-1), "eos_token_id -1 is outside the vocabulary"),
    "bos id outside the vocabulary": (cfg(bos_token_id=10**6), "bos_token_id 1000000 is outside"),
    "mask id equal to eos": (cfg(mask_token_id=2), "mask_token_id and eos_token_id are both 2"),
    "token id as a string": (cfg(eos_token_id="2"), "eos_token_id must be an integer token id"),
    "vocabulary too large for memory": (cfg(vocab_size=10**11), "GiB of float32 weights, more than this device's"),
    "context beyond support": (cfg(max_position_embeddings=2**40), "beyond the 16777216 tokens"),
    "rms_norm_eps 0": (cfg(rms_norm_eps=0), "rms_norm_eps must be a positive number"),
    "rope_theta negative": (cfg(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta"),
    "config is a list": (write("config.json", b"[1, 2]"), "must hold a JSON object"),
    "config is not JSON": (write("config.json", b"{nope"), "is not valid JSON"),
    "index climbing out with ..": (index(lambda names, o: {n: "../outside/model.safetensors" for n in names}), "outside the model directory"),
    "index naming an absolute path": (index(lambda names, o: {n: str(o / "model.safetensors") for n in names}), "outside the model directory"),
    "index weight_map not a map": (index(lambda names, o: ["model-00001-of-00001.safetensors"]), "weight_map must map"),
    "index entry not a string": (index(lambda names, o: {n: 7 for n in names}), "invalid shard 7"),
    "index shard symlinked outside": (lambda d, o: (index(lambda names, o: {n: "model-00001-of-00001.safetensors" for n in names})(d, o),
                                                    link("model-00001-of-00001.safetensors")(d, o)), "outside the model directory"),
    "weights symlinked outside": (link("model.safetensors"), "outside the model directory; refused"),
    "config symlinked outside": (link("config.json"), "outside the model directory; refused"),
    "tokenizer symlinked outside": (link("tokenizer.json"), "outside the model directory; refused"),
    "LoRA drafter symlinked outside": (link("linear_spec_lora/adapter_model.safetensors"), "outside the model directory"),
    "template too large": (template("x" * 300_000), "not a string of at most 262144 characters"),
    "template that never ends": (template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"), "ran longer than 2 s"),
    "template with huge output": (template("{% for i in range(100000) %}{{ 'xxxxxxxxxxxx' }}{% endfor %}"), "rendered more than"),
    "template building a huge string": (template("{{ 'a' * 10**9 }}"), "builds an oversized string"),
    "template escaping the sandbox": (template("{{ messages.__class__.__mro__ }}"), "failed to render"),
    "truncated safetensors": (lambda d, o: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "truncated"),
    "garbage safetensors header": (write("model.safetensors", b"\xff" * 64), "not a readable safetensors file"),
    "quantized artifact with a float qweight": (quantized_with_float_qweight, "expected packed integers"),
    "tokenizer larger than the model vocabulary": (big_tokenizer, "tokenizer has"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_checkpoint_is_refused(case, tiny_ckpt, tmp_path, capsys, monkeypatch):
    global OPENED
    breaker, match = CASES[case]
    d, outside = tmp_path / "ckpt", tmp_path / "outside"
    shutil.copytree(tiny_ckpt, d)
    outside.mkdir()
    breaker(d, outside)
    native = []
    real_open, real_tok = safetensors.safe_open, tokenizers.Tokenizer.from_file
    monkeypatch.setattr(safetensors, "safe_open", lambda f, *a, **k: (native.append(str(f)), real_open(f, *a, **k))[1])

    class Tok:  # tokenizers' Rust class cannot be patched: stand in for it
        @staticmethod
        def from_file(f):
            native.append(str(f))
            return real_tok(f)

        from_str = staticmethod(tokenizers.Tokenizer.from_str)  # the file itself was opened in Python (audited)

    monkeypatch.setattr(tokenizers, "Tokenizer", Tok)
    OPENED = []
    try:
        code = cli.main(["generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "2"])
    finally:
        opened, OPENED = OPENED + native, None
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    out = outside.resolve()
    assert not [f for f in opened if out in Path(f).resolve().parents], opened


def test_there_are_at_least_thirty(tiny_ckpt):
    assert len(CASES) >= 30


def test_hub_snapshot_links_into_its_blobs_are_fine(tiny_ckpt, tmp_path):
    """The Hub cache's own layout (snapshot files are links into ../../blobs) is not an escape."""
    import edge_dlm

    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_ckpt.rglob("*"):
        if f.is_file():
            blob = blobs / f"{abs(hash(str(f)))}"
            shutil.copy(f, blob)
            (snap / f.relative_to(tiny_ckpt)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(tiny_ckpt)).symlink_to(Path("../../blobs") / blob.name
                                                         if f.parent == tiny_ckpt else blob)
    assert edge_dlm.load(snap).generate([1, 40, 41], mode="ar", max_new_tokens=3).nfe == 3
