"""`edge-dlm export --quant`: a checkpoint -> a quantized artifact that loads directly.

The artifact is a normal checkpoint directory (config.json with a "quantization" entry, quantized
safetensors, tokenizer files, the LoRA drafter unchanged) plus manifest.json. It is built in a
temporary directory and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from edge_dlm.primitives.errors import UserError
from edge_dlm.export.manifest import tool_versions, write_manifest
from edge_dlm.primitives.fsutil import atomic_dir, check_room
from edge_dlm.model.quant import QuantSpec, require_bnb
from edge_dlm.model.quantize import quantize_model, quantized_state
from edge_dlm.model.weights import INDEX_FILE, LORA_DIR, PICKLE_SUFFIXES, SINGLE_FILE, check_dir, load_model

SKIP = {SINGLE_FILE, INDEX_FILE, "config.json", "manifest.json"}


def check_source(src: Path) -> dict:
    """The source's config.json, refusing quantized artifacts (re-quantizing compounds the error)."""
    src = check_dir(src)
    try:
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{src}/config.json is missing or invalid ({exc})") from None
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if q:
        raise UserError(f"{src} is already quantized ({q.get('scheme') or q.get('quant_method', '?')}); "
                        "export from the full-precision checkpoint instead")
    return cfg


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, model card, generation config and the LoRA drafter: everything but weights."""
    for p in src.iterdir():
        if p.name in SKIP or p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors" or p.name.startswith("."):
            continue
        if p.is_dir():
            if p.name == LORA_DIR:
                shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


FORMATS = ("edge-dlm", "compressed-tensors")


def export_quantized(src: str | Path, out: str | Path, spec: QuantSpec, *, force: bool = False,
                     fmt: str = "edge-dlm", log=print) -> dict:
    """Quantize checkpoint `src` into artifact directory `out`; returns the manifest.

    `fmt` "compressed-tensors" writes the pack-quantized layout vLLM, SGLang and transformers read
    (int4/int8, symmetric; the embedding stays float, as compressed-tensors quantizes Linear layers).
    """
    src = Path(src)
    cfg = check_source(src)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} not supported; known: {', '.join(FORMATS)}")
    if fmt == "compressed-tensors":
        from edge_dlm.model.formats import ct_config

        if spec.scheme not in ("int4", "int8"):
            raise UserError(f"--format compressed-tensors takes --quant int4 or int8, not {spec.scheme}")
        ct_config(spec, [])  # refuses --asymmetric with the reason
        spec = dataclasses.replace(spec, embedding=False)
    if spec.scheme in ("nf4", "llm-int8"):
        require_bnb()
    if spec.scheme == "llm-int8":
        raise UserError("llm-int8 is a load-time option (bitsandbytes quantizes it on load: "
                        "--quant llm-int8 on generate/chat); export int8, int4 or nf4")
    t0 = time.perf_counter()
    if spec.calibration:  # AWQ rescales weights by the model's own activations: the whole model, loaded
        from edge_dlm.primitives.tokenizer import Tokenizer

        # loaded in the checkpoint's own dtype, so what stays float (norms, an unquantized head) is
        # stored as it was; quantization itself works in fp32
        model = load_model(src, dtype=_source_dtype(src), lora=False)
        quantize_model(model, spec, Tokenizer.from_dir(src), log=log)
        if fmt == "compressed-tensors":
            state, qconfig = compressed_tensors_state(model, spec)
        else:
            state = quantized_state(model, spec)
        names, items, ignore = list(state), iter(state.items()), None
    else:  # one source tensor read, quantized and written at a time: memory follows the largest tensor
        names, items, ignore = streamed_state(src, cfg, spec, fmt)
        if fmt == "compressed-tensors":
            qconfig = ct_config(spec, ignore)
    before = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    check_room(out, estimated_bytes(cfg, spec, _source_dtype(src)), "the quantized weights need")
    with atomic_dir(out, force=force) as tmp:
        log(f"quantizing {src} -> {out} ({spec.scheme}, group {spec.group_size}, "
            f"{'symmetric' if spec.symmetric else 'asymmetric'})")
        write_safetensors(tmp / SINGLE_FILE, items, names, {"format": "pt", "quantization": spec.scheme})
        cfg = {**cfg, **({"quantization": spec.to_dict()} if fmt == "edge-dlm" else {"quantization_config": qconfig})}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        copy_side_files(src, tmp)
        extra = ("bitsandbytes",) if spec.scheme == "nf4" else ()
        manifest = write_manifest(tmp, src, kind="quantized", quantization=spec.to_dict(), format=fmt,
                                  precision=spec.scheme, targets=["torch"], tool_versions=tool_versions(*extra),
                                  weight_bytes={"source": before, "quantized": (tmp / SINGLE_FILE).stat().st_size},
                                  export_seconds=round(time.perf_counter() - t0, 3))
    log(f"wrote {out}: {manifest['weight_bytes']['quantized'] / 2**20:.2f} MiB of weights "
        f"in {manifest['export_seconds']:.1f} s")
    return manifest


def estimated_bytes(cfg: dict, spec: QuantSpec, dtype: torch.dtype) -> int:
    """About what the artifact's weights take: quantized weights at `spec`'s bits plus their scales (and
    zeros), every other tensor in the checkpoint's dtype."""
    from edge_dlm.model.config import NLDConfig
    from edge_dlm.model.weights import expected_shapes

    float_bytes = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name, shape in expected_shapes(NLDConfig.from_dict(cfg)).items():
        n = 1
        for d in shape:
            n *= d
        quantized = len(shape) == 2 and (name != "diffusion_head.weight" or spec.head) and \
            (name != "encoder.embed_tokens.weight" or spec.embedding)
        bits = 4 if spec.scheme == "nf4" else spec.bits if quantized else 0
        total += n * bits // 8 + (n // spec.group_size) * 2 * (1 if spec.symmetric else 2) if quantized \
            else n * float_bytes
    return total


# --- streamed writing: one tensor in memory at a time ------------------------------------------------

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def write_safetensors(path: Path, items, names: list[str], metadata: dict[str, str]) -> int:
    """Write the (name, tensor) pairs `items` yields as one safetensors file, each tensor written as it
    comes (so memory holds one at a time); returns the bytes written. The header goes first in the
    format but is known only at the end: room for it is reserved from `names` (every name `items` may
    yield) and filled last, padded with spaces (the format allows them)."""
    import struct

    # an entry: "NAME":{"dtype":"BF16","shape":[d0,d1],"data_offsets":[start,end]}, at most len(name) + 90 bytes
    reserve = 64 + len(json.dumps(metadata)) + sum(len(n) + 90 for n in names)
    reserve += -reserve % 8  # the data starts 8-byte aligned
    header: dict = {"__metadata__": metadata}
    offset = 0
    with open(path, "wb") as f:
        f.seek(8 + reserve)
        for name, t in items:
            t = t.detach().contiguous().cpu()
            n = t.numel() * t.element_size()
            header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            if n:
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > reserve:  # `names` did not cover what `items` yielded: a bug, not the user's
            raise RuntimeError(f"safetensors header of {len(text)} bytes overflows the {reserve} reserved")
        f.seek(0)
        f.write(struct.pack("<Q", reserve) + text + b" " * (reserve - len(text)))
    return 8 + reserve + offset


def streamed_state(src: Path, cfg, spec: QuantSpec, fmt: str):
    """The artifact's tensors, one source tensor read and quantized at a time: (names it may yield,
    the (name, tensor) generator, compressed-tensors' ignore list). The modules quantized are the ones
    `quantize_model` quantizes (`linear_names` of the model's structure, built on the meta device)."""
    from edge_dlm.model.config import NLDConfig
    from edge_dlm.model.nld import NLDModel
    from edge_dlm.model.quant import NF4Linear, QuantLinear, linear_names, quantizes
    from edge_dlm.model.weights import expected_shapes, read_tensors, weight_files

    config = NLDConfig.from_dict(cfg)
    with torch.device("meta"):
        skeleton = NLDModel(config)
    linears = set(linear_names(skeleton, spec))
    ignore = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in linears]
    embedding = quantizes("encoder.embed_tokens", spec)
    files = weight_files(src)
    shapes = expected_shapes(config)
    def quantized(module: str) -> bool:
        return module in linears or (module == "encoder.embed_tokens" and embedding)

    def outputs(name: str) -> list[str]:
        module = name.removesuffix(".weight")
        if not quantized(module):
            return [name]
        if fmt == "compressed-tensors":
            return [f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape"]
        if spec.scheme == "nf4":
            return [f"{module}.qweight", f"{module}.absmax"]
        return [f"{module}.qweight", f"{module}.scales"] + ([] if spec.symmetric else [f"{module}.zeros"])

    names = [out for name in shapes for out in outputs(name)]

    def items():
        for name in shapes:
            t = read_tensors(files, [name])[name]
            module = name.removesuffix(".weight")
            if quantized(module):
                q = (NF4Linear if spec.scheme == "nf4" else QuantLinear).from_weight(t, spec)
                del t
                if fmt == "compressed-tensors":
                    from edge_dlm.model.formats import ct_tensors

                    yield from ct_tensors(module, q).items()
                else:
                    yield from ((f"{module}.{k}", v) for k, v in q.state_dict().items() if v is not None)
            else:
                yield name, t

    return names, items(), ignore


def _source_dtype(src: Path) -> torch.dtype:
    from edge_dlm.model.weights import read_tensors, weight_files

    files = weight_files(src)
    return read_tensors(files, ["encoder.norm.weight"])["encoder.norm.weight"].dtype
