"""`edge-dlm export CKPT -o OUT.gguf --target gguf`: the checkpoint as one GGUF file for llama.cpp.

What llama.cpp (and Ollama, LM Studio, which run it) can do with an NLD checkpoint is AR decoding: the
model is a Ministral-3 decoder, llama.cpp's `mistral3` architecture. The file is written with the
`gguf` package (llama.cpp's own writer) and maps the checkpoint exactly as llama.cpp's converter maps
a Ministral-3 checkpoint (`convert_hf_to_gguf.py`, `Ministral3Model`):

- tensors: `encoder.embed_tokens` -> `token_embd`, `diffusion_head` -> `output` (NLD's head is untied),
  per layer `attn_norm`, `attn_q/k/v/output`, `ffn_norm`, `ffn_gate/up/down`, `output_norm`; q and k
  rows permuted from rotate-half (NeoX) to the interleaved pairs llama.cpp's `mistral3` rotates;
- RoPE: `rope.freq_base`, YaRN as `rope.scaling.*` (factor, original context, beta fast / slow,
  `yarn_log_multiplier` = `mscale_all_dim`);
- the Llama-4 query scale `1 + beta * log(1 + floor(pos / original_max_position_embeddings))` as
  `attention.temperature_scale` = beta (llama.cpp takes the original context as the floor length);
- the tokenizer (byte-level BPE: tokens, types, merges, BOS / EOS / UNK, the chat template).

What llama.cpp cannot express is refused with the reason: a YaRN `mscale` other than 1 or an explicit
`attention_factor` (llama.cpp assumes mscale = 1), YaRN without the truncated ramp (ggml floors and
ceils the correction range), a Llama-4 scale without YaRN's original context, a tokenizer that is not
byte-level BPE. The LoRA drafter and the mask token's role are diffusion-only and not written.

Weights: float32, float16 or bfloat16 (`--dtype`, default the checkpoint's own), or `--quant int8` ->
Q8_0 and `--quant int4` -> Q4_0 (llama.cpp's blocks of 32 with one scale: 2-D weights only, norms stay
float32, as llama.cpp's own quantizer does). Written to a temporary file and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from edge_dlm.primitives.errors import MissingDependencyError, UserError

ARCH = "mistral3"
QUANTS = {"int8": "Q8_0", "int4": "Q4_0"}
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
BLOCK = 32  # Q8_0 / Q4_0 block length


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("gguf", "gguf", "--target gguf (llama.cpp's GGUF writer)") from None
    return gguf


def check_mappable(cfg) -> None:
    """Refuse, with the reason, what llama.cpp's `mistral3` cannot run as this checkpoint does."""
    r = cfg.rope
    if r.rope_type == "yarn":
        if r.attention_factor is not None:
            raise UserError("rope_parameters.attention_factor is set; llama.cpp derives the YaRN attention factor "
                            "itself (mscale 1), so the GGUF would compute different logits")
        if r.mscale not in (None, 1.0):
            raise UserError(f"YaRN mscale {r.mscale}: llama.cpp's mistral3 assumes mscale 1.0")
        if not r.truncate:
            raise UserError("YaRN with truncate = false: llama.cpp always truncates the correction range")
        if not r.original_max_position_embeddings:
            raise UserError("YaRN without original_max_position_embeddings cannot be written to GGUF")
    if r.llama_4_scaling_beta and (r.rope_type != "yarn" or not r.original_max_position_embeddings):
        raise UserError("the Llama-4 query scale needs YaRN's original_max_position_embeddings in llama.cpp")


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from rotate-half order (pairs i, i + d/2 per head) to interleaved pairs (2i, 2i + 1)."""
    out, cols = w.shape
    return w.reshape(heads, 2, out // heads // 2, cols).transpose(1, 2).reshape(out, cols)


def tokenizer_fields(src: Path) -> dict:
    """Tokens, token types, merges and special ids from tokenizer.json / tokenizer_config.json."""
    from edge_dlm.primitives.inputs import read_json_object

    tok = read_json_object(src / "tokenizer.json", "tokenizer.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{src.name}: GGUF export takes a byte-level BPE tokenizer, this one is "
                        f"{model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens") or []}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    gguf = require_gguf()
    types = [gguf.TokenType.NORMAL] * n
    for i, text in enumerate(tokens):
        if text.startswith("[PAD") and text not in vocab:
            types[i] = gguf.TokenType.UNUSED
        elif text in added:
            types[i] = gguf.TokenType.CONTROL if added[text].get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    cfg_path = src / "tokenizer_config.json"
    tcfg = read_json_object(cfg_path, "tokenizer_config.json") if cfg_path.exists() else {}

    def special(key: str) -> int | None:
        v = tcfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    return {"tokens": tokens, "types": types, "merges": merges, "bos": special("bos_token"),
            "eos": special("eos_token"), "unk": special("unk_token"), "template": tcfg.get("chat_template")}


def tensors(model, cfg) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) in llama.cpp's order and layout."""
    enc = model.encoder
    out = [("token_embd.weight", enc.embed_tokens.weight)]
    for i, layer in enumerate(enc.layers):
        a, m = layer.self_attn, layer.mlp
        out += [(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight),
                (f"blk.{i}.attn_q.weight", permute_rope(a.q_proj.weight, cfg.num_attention_heads)),
                (f"blk.{i}.attn_k.weight", permute_rope(a.k_proj.weight, cfg.num_key_value_heads)),
                (f"blk.{i}.attn_v.weight", a.v_proj.weight),
                (f"blk.{i}.attn_output.weight", a.o_proj.weight),
                (f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight),
                (f"blk.{i}.ffn_gate.weight", m.gate_proj.weight),
                (f"blk.{i}.ffn_up.weight", m.up_proj.weight),
                (f"blk.{i}.ffn_down.weight", m.down_proj.weight)]
    out += [("output_norm.weight", enc.norm.weight), ("output.weight", model.diffusion_head.weight)]
    return [(name, t.detach().float()) for name, t in out]


def export_gguf(src: str | Path, out: str | Path, *, quant: str | None = None, dtype: str | None = None,
                force: bool = False, log=print) -> Path:
    """Write checkpoint `src` as the GGUF file `out`; returns its path."""
    from edge_dlm.export.quantize import check_source
    from edge_dlm.model.weights import load_model
    from edge_dlm.primitives.fsutil import check_output_file

    gguf = require_gguf()
    src, out = Path(src), Path(out)
    if quant is not None and quant not in QUANTS:
        raise UserError(f"--target gguf takes --quant {' or '.join(QUANTS)} (Q8_0, Q4_0), not {quant}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--target gguf takes --dtype {', '.join(DTYPES)}, not {dtype}")
    if out.suffix != ".gguf":
        raise UserError(f"-o {out}: a GGUF export is one file; name it NAME.gguf")
    check_output_file(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    raw = check_source(src)
    model = load_model(src, dtype=torch.float32, lora=False)
    cfg = model.config
    check_mappable(cfg)
    vocab = tokenizer_fields(src)
    if len(vocab["tokens"]) > cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(vocab['tokens'])} tokens, more than the model's {cfg.vocab_size}")
    vocab["tokens"] += [f"[PAD{i}]" for i in range(len(vocab["tokens"]), cfg.vocab_size)]
    vocab["types"] += [gguf.TokenType.UNUSED] * (cfg.vocab_size - len(vocab["types"]))
    src_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
    float_type = getattr(gguf.GGMLQuantizationType, DTYPES.get(dtype or src_dtype, "BF16"))
    qtype = getattr(gguf.GGMLQuantizationType, QUANTS[quant]) if quant else None
    if qtype is not None:
        bad = [n for n, t in tensors(model, cfg) if t.dim() == 2 and t.shape[1] % BLOCK]
        if bad:
            raise UserError(f"{QUANTS[quant]} needs rows that are a multiple of {BLOCK}; {bad[0]} is not")
    file_type = {None: {"F32": 0, "F16": 1, "BF16": 32}[float_type.name], "int8": 7, "int4": 2}[quant]

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name(src.resolve().name)
        w.add_file_type(file_type)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        r = cfg.rope
        w.add_rope_freq_base(r.rope_theta)
        if r.rope_type == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(r.factor)
            w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
            w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
            w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
            if r.mscale_all_dim:
                w.add_rope_scaling_yarn_log_mul(r.mscale_all_dim)
        if r.llama_4_scaling_beta:
            w.add_attn_temperature_scale(r.llama_4_scaling_beta)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)):
            if vocab[key] is not None:
                add(vocab[key])
        w.add_add_bos_token(False)  # the chat template writes BOS itself, as edge-dlm's encoder does
        if isinstance(vocab["template"], str):
            w.add_chat_template(vocab["template"])
        for name, t in tensors(model, cfg):
            data = t.numpy()
            kind = qtype if qtype is not None and t.dim() == 2 else (float_type if t.dim() == 2 else None)
            if kind is None or kind == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, data.astype(np.float32))
            elif kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, data.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)  # its bytes: the shape follows
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    log(f"wrote {out} ({size / 2**20:.1f} MiB, {ARCH}, {QUANTS.get(quant) or float_type.name}); "
        f"run it in llama.cpp: llama-cli -m {out}")
    return out


def read_back(path: str | Path) -> dict:
    """Metadata and tensor names of a GGUF file, as the `gguf` package reads it (for tests and tools)."""
    gguf = require_gguf()
    r = gguf.GGUFReader(str(path))
    meta = {}
    for f in r.fields.values():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        v = f.parts[f.data[0]] if f.data else None
        if v is not None:
            meta[f.name] = bytes(v).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]
    return {"meta": meta, "tensors": {t.name: t for t in r.tensors}, "reader": r}
