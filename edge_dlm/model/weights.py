"""Checkpoint I/O: safetensors only (one file or sharded), validated tensor by tensor.

Pickle formats (`*.bin`, `*.pt`, ...) are refused: loading them can execute arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from edge_dlm.model.config import NLDConfig
from edge_dlm.model.nld import NLDModel, rope_inv_freq
from edge_dlm.primitives.errors import CheckpointError
from edge_dlm.primitives.inputs import read_json_object

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LORA_DIR = "linear_spec_lora"
# every file (or folder) of a model directory that edge-dlm may open
MODEL_FILES = ["config.json", SINGLE_FILE, INDEX_FILE, "tokenizer.json", "tokenizer_config.json",
               "manifest.json", "model.onnx", LORA_DIR]


def expected_shapes(cfg: NLDConfig, spec=None) -> dict[str, tuple[int, ...]]:
    """Every tensor an NLD checkpoint must hold, with its shape (`nld.md`, "Tensors").

    With a `QuantSpec`, the weights it quantizes are replaced by their stored quantized tensors.
    """
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"encoder.embed_tokens.weight": (v, h), "encoder.norm.weight": (h,),
              "diffusion_head.weight": (v, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    if spec is None:
        return shapes
    from edge_dlm.model.quant import quantized_shapes, quantizes

    out = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if len(shape) == 2 and quantizes(module, spec):  # norms (1-D) stay float
            out |= quantized_shapes(module, *shape, spec)
        else:
            out[name] = shape
    return out


def check_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; --model takes a checkpoint directory")
    from edge_dlm.model.checks import check_files

    check_files(path, MODEL_FILES, (LORA_DIR,))  # nothing edge-dlm reads may lead outside the directory
    return path


def weight_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the shard index or the single file's header."""
    index = path / INDEX_FILE
    if index.exists():
        from edge_dlm.model.checks import contained, regular_file

        weight_map = read_json_object(index, str(index), error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = {name: contained(path, f, "shard") for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists() and not f.is_symlink():
                raise CheckpointError(f"shard {f.name} named in {INDEX_FILE} is missing from {path}")
            regular_file(f, "shard")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); edge-dlm loads safetensors "
                f"only, since pickle can run code: convert them to model.safetensors")
        raise CheckpointError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}")
    from edge_dlm.model.checks import regular_file

    return {n: single for n in tensor_names(regular_file(single, "weights file"))}


def read_tensors(files: dict[str, Path], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read the named tensors (all by default), grouped by file, failing with a one-line error."""
    from safetensors import SafetensorError, safe_open

    wanted = names if names is not None else list(files)
    by_file: dict[Path, list[str]] = {}
    for n in wanted:
        by_file.setdefault(files[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    for f, group in by_file.items():
        try:
            with safe_open(f, framework="pt") as st:
                for n in group:
                    out[n] = st.get_tensor(n)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {f.name} ({exc}); the file may be truncated") from None
    return out


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", lora: bool = True, quantize=None) -> NLDModel:
    """Load config + weights (+ the LinearSpec LoRA drafter when present and `lora`) into `NLDModel`.

    A quantized artifact (config.json has "quantization") loads into quantized modules directly;
    its float tensors (norms, an unquantized head) are cast to `dtype`. `quantize` (a `QuantSpec`:
    int8, int4 or nf4, uncalibrated) quantizes a full-precision checkpoint as it loads, one weight
    read and quantized at a time (`_quantized_modules`), so memory follows the quantized model, not
    the float one; the modules are those `quantize_model` makes, with the same numbers.
    """
    from edge_dlm.model.checks import check_bytes, check_finite, check_headers, check_memory

    path = check_dir(path)
    cfg = NLDConfig.from_file(path / "config.json")
    check_bytes(cfg.parameter_count() // 2, dtype, device)  # int4's half byte a weight: before listing shapes
    spec = quant_spec(cfg, path)
    files = weight_files(path)
    community = None if spec is not None else community_format(path)
    shapes = expected_shapes(cfg, spec) if community is None else community_shapes(cfg, community, files)
    missing = [n for n in shapes if n not in files]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {path} lacks tensors: {', '.join(missing[:3])}{more}")
    if quantize is not None and (spec is not None or community is not None):
        from edge_dlm.primitives.errors import UserError

        raise UserError(f"{path} is already quantized ({(spec.scheme if spec else None) or 'community format'}); "
                        "drop --quant, or quantize the full-precision checkpoint")
    check_memory(shapes if quantize is None else expected_shapes(cfg, quantize), dtype, device)
    check_headers(files, shapes, quantized=spec is not None or community is not None)  # before reading data
    streamed = {} if quantize is None else _quantized_modules(cfg, files, quantize, dtype, device)
    tensors = read_tensors(files, [n for n in shapes if n.removesuffix(".weight") not in streamed])
    check_finite(tensors)
    if community is not None:  # what status lines, calibration and exporters see
        cfg = dataclasses.replace(cfg, quantization=community.spec().to_dict())
    with torch.device("meta"):
        model = NLDModel(cfg)
    if spec is not None:
        from edge_dlm.model.quantize import build_quantized

        build_quantized(model, spec, tensors, dtype)
    if community is not None:
        from edge_dlm.model.formats import build, packed

        for name, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and packed(name, files, community):
                model.set_submodule(name, build(name, m.out_features, m.in_features, community, tensors))
    for name, mod in streamed.items():
        if name == "encoder.embed_tokens":
            from edge_dlm.model.quant import QuantEmbedding

            mod = QuantEmbedding(mod, dtype)
        model.set_submodule(name, mod)
    state = _cast(tensors, dtype, device)
    model.load_state_dict(state, strict=spec is None and community is None and not streamed, assign=True)
    model.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
    model.to(device)
    if lora:
        load_lora(model, path)
    return model.eval().requires_grad_(False)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """The tensors on `device` in `dtype`, one at a time, each original dropped (its file's pages handed
    back, `page_out`) as its cast is made: a model loaded in another precision than its checkpoint's peaks
    at the cast model and one tensor, not both models (an fp16 ONNX export of a bf16 3B checkpoint)."""
    from edge_dlm.model.quant import page_out

    out = {}
    for name in list(tensors):
        t = tensors.pop(name)
        out[name] = t.to(device=device, dtype=dtype)
        if out[name].data_ptr() != t.data_ptr():
            page_out(t)
        del t
    return out


def _quantized_modules(cfg: NLDConfig, files: dict[str, Path], spec, dtype: torch.dtype, device) -> dict:
    """The quantized modules `spec` makes of a checkpoint, by module name, each weight read, cast to
    `dtype` (as a loaded model holds it), quantized on `device` and dropped before the next is read."""
    from edge_dlm.model.checks import check_finite
    from edge_dlm.model.quant import NF4Linear, QuantLinear, linear_names, quantizes

    with torch.device("meta"):
        skeleton = NLDModel(cfg)
    names = linear_names(skeleton, spec) + (["encoder.embed_tokens"] if quantizes("encoder.embed_tokens", spec) else [])
    # the largest weights first: the peak is one float weight beside what is quantized so far
    names.sort(key=lambda n: -skeleton.get_submodule(n).weight.numel())
    made = {}
    for name in names:
        w = read_tensors(files, [f"{name}.weight"])
        check_finite(w)
        w = w.popitem()[1].to(device=device, dtype=dtype)
        cls = NF4Linear if spec.scheme == "nf4" and name != "encoder.embed_tokens" else QuantLinear
        made[name] = cls.from_weight(w, spec).to(w.device)
        del w
    return made


def community_format(path: Path):
    """The compressed-tensors / GPTQ format of config.json's quantization_config, or None."""
    from edge_dlm.model.formats import detect

    raw = read_json_object(path / "config.json", error=CheckpointError)
    return detect(raw, str(path / "config.json"))


def community_shapes(cfg: NLDConfig, c, files: dict) -> dict[str, tuple[int, ...]]:
    """`expected_shapes` with each linear weight the checkpoint stores packed replaced by its tensors."""
    from edge_dlm.model.formats import packed, stored_shapes

    out = {}
    for name, shape in expected_shapes(cfg).items():
        module = name.removesuffix(".weight")
        if len(shape) == 2 and module != "encoder.embed_tokens" and packed(module, files, c):
            out |= stored_shapes(module, *shape, c, files)
        else:
            out[name] = shape
    return out


def quant_spec(cfg: NLDConfig, path: Path):
    """The artifact's `QuantSpec`, or None for a full-precision checkpoint."""
    if not cfg.quantization:
        return None
    from edge_dlm.primitives.errors import UserError
    from edge_dlm.model.quant import QuantSpec

    try:
        spec = QuantSpec.from_dict(cfg.quantization)
    except (TypeError, UserError) as exc:
        raise CheckpointError(f"{path}/config.json has an invalid quantization entry ({exc})") from None
    if spec.scheme == "nf4":
        from edge_dlm.model.quant import require_bnb

        require_bnb()
    return spec


def has_lora(path: str | Path) -> bool:
    return (Path(path) / LORA_DIR / "adapter_model.safetensors").exists()


def load_lora(model: NLDModel, path: Path) -> bool:
    """Attach the PEFT `o_proj` adapter in `linear_spec_lora/` to each layer; False when absent."""
    lora_dir = path / LORA_DIR
    if not has_lora(path):
        return False
    where = f"{lora_dir}/adapter_config.json"
    if not (lora_dir / "adapter_config.json").exists():
        raise CheckpointError(f"{where} is missing; the LoRA drafter needs it (or pass --no-lora)")
    acfg = read_json_object(lora_dir / "adapter_config.json", where, error=CheckpointError)
    r, alpha, rs = acfg.get("r"), acfg.get("lora_alpha"), acfg.get("use_rslora", False)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 1 << 16:
        raise CheckpointError(f"{where}: r must be a positive integer rank, got {r!r}")
    if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha)
            or abs(alpha) > 1e6):
        raise CheckpointError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(rs, bool):
        raise CheckpointError(f"{where}: use_rslora must be true or false, got {rs!r}")
    scale = alpha / r ** 0.5 if rs else alpha / r
    from edge_dlm.model.checks import check_finite, regular_file

    adapter = regular_file(lora_dir / "adapter_model.safetensors", "LoRA drafter")
    tensors = read_tensors({n: adapter for n in tensor_names(adapter)})
    if any(t.dtype not in LORA_DTYPES for t in tensors.values()):
        bad = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.dtype not in LORA_DTYPES})
        raise CheckpointError(f"{adapter} stores {', '.join(bad)} tensors; a LoRA drafter is floating point (float16, bfloat16 or "
                              "float32)")
    check_finite(tensors, " of the LoRA drafter")
    p = model.encoder.norm.weight  # a float parameter even in a quantized model
    for i, layer in enumerate(model.encoder.layers):
        attn = layer.self_attn
        key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_"
        try:
            a, b = tensors[key + "A.weight"], tensors[key + "B.weight"]
        except KeyError:
            raise CheckpointError(f"LoRA drafter lacks {key}A/B.weight for layer {i}") from None
        out_f, in_f = model.config.hidden_size, attn.nq * attn.hd
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise CheckpointError(f"LoRA tensors of layer {i} have shapes {list(a.shape)}/{list(b.shape)}, "
                                  f"expected {[r, in_f]}/{[out_f, r]}")
        dtype = p.dtype if p.is_floating_point() else torch.float32
        attn.o_lora = (a.to(p.device, dtype), b.to(p.device, dtype), scale)
    return True


def tensor_names(f: Path) -> list[str]:
    """The tensor names in one safetensors file's header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(f, framework="pt") as st:
            return list(st.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{f} is not a readable safetensors file ({exc}); is it truncated?") from None


def save_checkpoint(model_or_state: NLDModel | dict[str, torch.Tensor], cfg: NLDConfig, path: Path,
                    dtype: torch.dtype | None = None) -> None:
    """Write `config.json` + `model.safetensors` into an existing directory `path`."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in state.items()}
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
