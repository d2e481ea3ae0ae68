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
- the tokenizer (byte-level BPE: tokens, types, merges, BOS / EOS / UNK, the chat template) with
  llama.cpp's pre-tokenizer type read from the tokenizer's own split regex (`pre_type`);
- `nld.mask_token_id` and `nld.block_size` as metadata, and `NAME.Modelfile` beside the file for Ollama
  (`export.modelfile`).

What llama.cpp cannot express is refused with the reason: a YaRN `mscale` other than 1 or an explicit
`attention_factor` (llama.cpp assumes mscale = 1), YaRN without the truncated ramp (ggml floors and
ceils the correction range), a Llama-4 scale without YaRN's original context, a tokenizer that is not
byte-level BPE or splits text with a regex llama.cpp has no pre-tokenizer for. The LoRA drafter is
diffusion-only and not written.

Weights: float32, float16 or bfloat16 (`--dtype`, default the checkpoint's own), or `--quant int8` ->
Q8_0 and `--quant int4` -> Q4_0 (blocks of 32 with one fp16 scale holding edge-dlm's own int8 / int4
values, `blocks`; 2-D weights only, norms stay float32). Streamed: each tensor is read a slice of rows at
a time and written as it is converted, into a temporary file renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from edge_dlm.primitives.errors import MissingDependencyError, UserError
from edge_dlm.primitives.tokenizer import GPT2_REGEX, TEKKEN_REGEX

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


# The split regexes llama.cpp has a pre-tokenizer type for (`tokenizer.ggml.pre`): `llama-vocab.cpp`
# picks its regex by that name, and the byte-level BPE runs on each piece (gpt-2's exactly; tekken's with
# the gap `GAPS` states). A regex not in this table would be split by some other regex there: a
# different model for every prompt the two split differently, so it is refused rather than approximated.
PRE_TYPES = {GPT2_REGEX: "gpt-2", TEKKEN_REGEX: "tekken"}  # edge_dlm.primitives.tokenizer has both


def split_regex(tok: dict) -> str:
    """The one regex a byte-level BPE tokenizer splits text with before its merges; refuses (one line)
    a normalizer, a prefix space, or a pre-tokenizer chain that is not one split then byte-level."""
    if tok.get("normalizer"):
        raise UserError(f"the tokenizer normalizes text ({tok['normalizer'].get('type')}); llama.cpp's byte-level "
                        "BPE does not, so the GGUF would tokenize differently")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if isinstance(s, dict)]
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise UserError("GGUF export takes a byte-level BPE tokenizer (pre-tokenizer ending in ByteLevel); this one's "
                        f"is {[s.get('type') for s in steps]}")
    last = steps[-1]
    if last.get("add_prefix_space"):
        raise UserError("the tokenizer adds a prefix space (ByteLevel add_prefix_space); llama.cpp's byte-level "
                        "BPE does not, so the GGUF would tokenize differently")
    if len(steps) == 1 and last.get("use_regex", True):
        return GPT2_REGEX
    split = steps[0] if len(steps) == 2 and not last.get("use_regex", True) else {}
    pattern = (split.get("pattern") or {}).get("Regex")
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") or not pattern:
        raise UserError("the tokenizer's pre-tokenizer is not one regex split then byte-level "
                        f"({[s.get('type') for s in steps]}); llama.cpp cannot split text as it does")
    return pattern


# Where llama.cpp's pre-tokenizer of a type is known to split text otherwise than the regex it stands for.
# Its "tekken" regex replaces the letter classes by ASCII-case lookaheads and leaves combining marks out
# of words, so text with a combining mark (Devanagari vowel signs, decomposed accents, an emoji's
# variation selector) or a non-ASCII capital gets other ids there; every other string, the same ids
# (tests/export/test_llama_cpp.py: thousands of strings outside this class, all equal; every difference
# found lies inside it). Written on every such export, never silent.
GAPS = {"tekken": "llama.cpp's tekken pre-tokenizer splits text holding a combining mark (Devanagari vowel signs, "
                  "decomposed accents, emoji variation selectors) or a non-ASCII capital letter otherwise than this "
                  "tokenizer, so such prompts get other token ids in llama.cpp / Ollama; all other text the same ids"}


def tekken_gap(text: str) -> bool:
    """Whether `text` is in the class llama.cpp's tekken pre-tokenizer may split otherwise (`GAPS`)."""
    import unicodedata

    return any(unicodedata.category(c)[0] == "M" or (c > "\x7f" and unicodedata.category(c) in ("Lu", "Lt"))
               for c in text)


def pre_type(tok: dict) -> str:
    """llama.cpp's pre-tokenizer type for this tokenizer.json, or a one-line refusal."""
    regex = split_regex(tok)
    if regex not in PRE_TYPES:
        raise UserError(f"the tokenizer splits text with a regex llama.cpp has no pre-tokenizer for "
                        f"({regex[:60]}...); the GGUF would tokenize differently, so it is not written")
    return PRE_TYPES[regex]


def tokenizer_fields(src: Path) -> dict:
    """Tokens, token types, merges, special ids and llama.cpp's pre-tokenizer type from tokenizer.json /
    tokenizer_config.json."""
    from edge_dlm.primitives.inputs import read_json_object

    tok = read_json_object(src / "tokenizer.json", "tokenizer.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{src.name}: GGUF export takes a byte-level BPE tokenizer, this one is "
                        f"{model.get('type')!r}")
    pre = pre_type(tok)
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
            "eos": special("eos_token"), "unk": special("unk_token"), "template": tcfg.get("chat_template"),
            "pre": pre}


def plan(cfg) -> list[tuple[str, str, int | None]]:
    """(GGUF name, checkpoint name, heads to permute for or None) in llama.cpp's order and layout."""
    out = [("token_embd.weight", "encoder.embed_tokens.weight", None)]
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        out += [(f"blk.{i}.attn_norm.weight", pre + "input_layernorm.weight", None),
                (f"blk.{i}.attn_q.weight", pre + "self_attn.q_proj.weight", cfg.num_attention_heads),
                (f"blk.{i}.attn_k.weight", pre + "self_attn.k_proj.weight", cfg.num_key_value_heads),
                (f"blk.{i}.attn_v.weight", pre + "self_attn.v_proj.weight", None),
                (f"blk.{i}.attn_output.weight", pre + "self_attn.o_proj.weight", None),
                (f"blk.{i}.ffn_norm.weight", pre + "post_attention_layernorm.weight", None),
                (f"blk.{i}.ffn_gate.weight", pre + "mlp.gate_proj.weight", None),
                (f"blk.{i}.ffn_up.weight", pre + "mlp.up_proj.weight", None),
                (f"blk.{i}.ffn_down.weight", pre + "mlp.down_proj.weight", None)]
    return out + [("output_norm.weight", "encoder.norm.weight", None), ("output.weight", "diffusion_head.weight", None)]


def source_tensors(src: Path, cfg) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Where each tensor the export reads lives, and its shape, checked against the config from the
    safetensors headers (nothing is read yet)."""
    from edge_dlm.model.checks import check_headers
    from edge_dlm.model.weights import expected_shapes, weight_files

    files = weight_files(src)
    shapes = {n: s for n, s in expected_shapes(cfg).items() if n in {c for _, c, _ in plan(cfg)}}
    missing = [n for n in shapes if n not in files]
    if missing:
        raise UserError(f"checkpoint {src} lacks tensors: {', '.join(missing[:3])}")
    check_headers(files, shapes, quantized=False)
    return files, shapes


def out_nbytes(shape: tuple[int, ...], kind) -> int:
    gguf = require_gguf()
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape)) // block * size


ROWS = 4096  # rows converted at a time (a 3B embedding's 131,072 rows in 32 steps)


def convert(file: Path, name: str, shape: tuple[int, ...], heads: int | None, kind) -> np.ndarray:
    """Checkpoint tensor `name` as the bytes of GGML type `kind`, in llama.cpp's layout, converted a
    slice of rows at a time (q / k, which their RoPE permutation mixes across a head, whole)."""
    from safetensors import SafetensorError, safe_open

    from edge_dlm.model.checks import check_finite

    gguf = require_gguf()
    out = np.empty(gguf.quant_shape_to_byte_shape(shape, kind), dtype=np.uint8)
    by_row = out.reshape(shape[0], -1)  # a view: each row's bytes (a 1-D tensor: each element's)
    try:
        with safe_open(file, framework="pt") as st:
            sl = st.get_slice(name)
            step = shape[0] if heads or len(shape) == 1 else ROWS
            for r in range(0, shape[0], step):
                t = sl[r:r + step].float()
                check_finite({name: t})
                if heads:
                    t = permute_rope(t, heads)
                data = t.numpy()
                if kind == gguf.GGMLQuantizationType.F32:
                    b = data.astype(np.float32).view(np.uint8)
                elif kind == gguf.GGMLQuantizationType.F16:
                    b = data.astype(np.float16).view(np.uint8)
                elif kind.name in ("Q8_0", "Q4_0"):
                    b = blocks(t, 8 if kind.name == "Q8_0" else 4)
                else:
                    b = gguf.quants.quantize(data, kind)
                by_row[r:r + step] = b.reshape(len(t), -1)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise UserError(f"cannot read {name} from {file.name} ({str(exc)[:100]}); the file may be truncated") from None
    return out


def blocks(w: torch.Tensor, bits: int) -> np.ndarray:
    """`w [rows, cols]` as Q8_0 / Q4_0 blocks holding edge-dlm's own int8 / int4 quantization at group
    size 32 (`edge_dlm.model.quant.quantize`, symmetric, fp16 scales): each block is the fp16 scale, then
    32 int8 values (Q8_0) or 16 bytes of nibbles q + 8, element j low and j + 16 high (Q4_0). llama.cpp
    then multiplies by exactly the weights edge-dlm's `--quant int8|int4 --group-size 32` does (its own
    quantizer maps a block's largest magnitude to -8 instead, a different grid)."""
    from edge_dlm.model.quant import quantize, unpack_int4

    q = quantize(w, bits, BLOCK, symmetric=True)
    ints = q["qweight"] if bits == 8 else unpack_int4(q["qweight"], signed=True)
    rows, cols = w.shape
    n = cols // BLOCK
    scale = q["scales"].numpy().astype(np.float16).view(np.uint8).reshape(rows, n, 2)
    vals = ints.numpy().reshape(rows, n, BLOCK)
    if bits == 8:
        body = vals.view(np.uint8)
    else:
        nib = (vals + 8).astype(np.uint8)
        body = nib[..., :BLOCK // 2] | (nib[..., BLOCK // 2:] << 4)
    return np.concatenate([scale, body], axis=-1).reshape(rows, -1)


def export_gguf(src: str | Path, out: str | Path, *, quant: str | None = None, dtype: str | None = None,
                force: bool = False, log=print) -> Path:
    """Write checkpoint `src` as the GGUF file `out`; returns its path."""
    from edge_dlm.export.quantize import check_source
    from edge_dlm.model.config import NLDConfig
    from edge_dlm.model.weights import check_dir
    from edge_dlm.primitives.fsutil import check_output_file, check_room, temp_file

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
    cfg = NLDConfig.from_file(check_dir(src) / "config.json")
    check_mappable(cfg)
    vocab = tokenizer_fields(src)
    if len(vocab["tokens"]) > cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(vocab['tokens'])} tokens, more than the model's {cfg.vocab_size}")
    vocab["tokens"] += [f"[PAD{i}]" for i in range(len(vocab["tokens"]), cfg.vocab_size)]
    vocab["types"] += [gguf.TokenType.UNUSED] * (cfg.vocab_size - len(vocab["types"]))
    src_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
    float_type = getattr(gguf.GGMLQuantizationType, DTYPES.get(dtype or src_dtype, "BF16"))
    qtype = getattr(gguf.GGMLQuantizationType, QUANTS[quant]) if quant else None
    files, shapes = source_tensors(src, cfg)
    kinds = {}
    for name, ckpt, _ in plan(cfg):
        two_d = len(shapes[ckpt]) == 2
        kinds[name] = (qtype or float_type) if two_d else gguf.GGMLQuantizationType.F32  # norms stay float32
        if two_d and qtype is not None and shapes[ckpt][1] % BLOCK:
            raise UserError(f"{QUANTS[quant]} needs rows that are a multiple of {BLOCK}; {name} is not")
    file_type = {None: {"F32": 0, "F16": 1, "BF16": 32}[float_type.name], "int8": 7, "int4": 2}[quant]
    need = sum(out_nbytes(shapes[ckpt], kinds[name]) for name, ckpt, _ in plan(cfg)) + (1 << 20)
    check_room(out, need, "the GGUF needs")

    fd, tmp = temp_file(out)  # a kill leaves it; the next export to `out` removes it
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
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)):
            if vocab[key] is not None:
                add(vocab[key])
        w.add_add_bos_token(False)  # the chat template writes BOS itself, as edge-dlm's encoder does
        if isinstance(vocab["template"], str):
            w.add_chat_template(vocab["template"])
        # what only the diffusion modes use, for tools that read it (llama.cpp ignores the namespace)
        w.add_uint32("nld.mask_token_id", cfg.mask_token_id)
        w.add_uint32("nld.block_size", cfg.block_size)
        w.add_string("nld.not_carried", "the LoRA drafter (linear-spec); llama.cpp decodes AR only")
        steps = plan(cfg)
        for name, ckpt, _ in steps:  # the tensor table first: shapes and types are known from the headers
            kind = kinds[name]
            w.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shapes[ckpt], kind), np.dtype(np.uint8),
                              out_nbytes(shapes[ckpt], kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, ckpt, heads in steps:  # then one tensor at a time: memory follows the largest tensor
            w.write_tensor_data(convert(files[ckpt], ckpt, shapes[ckpt], heads, kinds[name]))
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    log(f"wrote {out} ({size / 2**20:.1f} MiB, {ARCH}, {QUANTS.get(quant) or float_type.name}); "
        f"run it in llama.cpp: llama-cli -m {out}")
    if vocab["pre"] in GAPS:
        log(f"note: {GAPS[vocab['pre']]}")
    write_modelfile(src, out, vocab, log)
    return out


def write_modelfile(src: Path, out: Path, vocab: dict, log) -> Path:
    """NAME.Modelfile beside NAME.gguf: FROM, the chat template in Ollama's syntax where it converts
    exactly (`export.modelfile`), the EOS text as a stop."""
    from edge_dlm.export.modelfile import modelfile
    from edge_dlm.primitives.fsutil import atomic_write_bytes
    from edge_dlm.primitives.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(src)
    render = None
    if tok.chat_template:
        render = lambda messages, agp: tok.render_chat(messages, add_generation_prompt=agp)  # noqa: E731
    stops = [vocab["tokens"][vocab["eos"]]] if vocab["eos"] is not None else []
    text, why = modelfile(out.name, render, stops)
    path = out.with_suffix(".Modelfile")
    atomic_write_bytes(path, text.encode("utf-8"))
    log(f"wrote {path}: ollama create NAME -f {path}" + (f" (no TEMPLATE: {why})" if why else ""))
    return path


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
