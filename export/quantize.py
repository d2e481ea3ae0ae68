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
from edge_dlm.primitives.fsutil import atomic_dir
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
    from safetensors.torch import save_file

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
    # Loaded in the checkpoint's own dtype, so what stays float (norms, an unquantized head) is
    # stored as it was; quantization itself works in fp32.
    model = load_model(src, dtype=_source_dtype(src), lora=False)
    tokenizer = None
    if spec.calibration:
        from edge_dlm.primitives.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(src)
    quantize_model(model, spec, tokenizer, log=log)
    if fmt == "compressed-tensors":
        state, qconfig = compressed_tensors_state(model, spec)
    else:
        state = {k: v.contiguous() for k, v in quantized_state(model, spec).items()}
    before = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    with atomic_dir(out, force=force) as tmp:
        log(f"quantizing {src} -> {out} ({spec.scheme}, group {spec.group_size}, "
            f"{'symmetric' if spec.symmetric else 'asymmetric'})")
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt", "quantization": spec.scheme})
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


def compressed_tensors_state(model, spec: QuantSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """The quantized model's tensors in compressed-tensors' pack-quantized layout, and its config."""
    from edge_dlm.model.formats import ct_config, ct_tensors
    from edge_dlm.model.quant import QuantLinear

    state = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        state |= ct_tensors(name, m)
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in quantized:
            state[name] = t.contiguous()
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]  # kept float (--keep-head)
    return state, ct_config(spec, ignore)


def _source_dtype(src: Path) -> torch.dtype:
    from edge_dlm.model.weights import read_tensors, weight_files

    files = weight_files(src)
    return read_tensors(files, ["encoder.norm.weight"])["encoder.norm.weight"].dtype
