"""`edge-dlm export CKPT -o OUT [--quant ...] [--target ...]`."""

from __future__ import annotations

import argparse

QUANTS = ("int8", "int4", "nf4")
TARGETS = ("torch", "onnx", "tensorrt", "tensorrt-rtx", "gguf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="source checkpoint: a directory or ORG/NAME[@REVISION] (full precision)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create (--target gguf: a NAME.gguf file)")
    p.add_argument("--quant", help=f"weight-only quantization: {', '.join(QUANTS)}")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64 or 128 (default 64)")
    p.add_argument("--asymmetric", action="store_true", help="int8/int4 with a per-group minimum (default symmetric)")
    p.add_argument("--keep-head", action="store_true", help="leave diffusion_head in full precision")
    p.add_argument("--calibrate", action="store_true", help="--target torch, int4/int8: rescale and clip the "
                   "weights on calibration text before quantizing (AWQ; a few hundred bundled tokens)")
    p.add_argument("--format", default="edge-dlm", choices=("edge-dlm", "compressed-tensors"),
                   help="--target torch: edge-dlm (default: also quantizes the embedding, allows --asymmetric) or "
                   "compressed-tensors (pack-quantized: loads in vLLM, SGLang, transformers)")
    p.add_argument("--target", default="torch",
                   help="torch (safetensors for the torch engine), onnx, tensorrt (this machine's GPU) or "
                   "tensorrt-rtx (RTX / Ampere GPUs, built on any machine), or gguf (one file for llama.cpp, "
                   "Ollama, LM Studio: AR decoding; --quant int8 / int4 write Q8_0 / Q4_0) (default torch)")
    p.add_argument("--dtype", default=None,
                   help="ONNX: float32 (default) or float16; TensorRT: float16 (default), bfloat16 or float32; "
                   "GGUF: float32, float16 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--compute-capability", action="append", metavar="CC",
                   help="tensorrt-rtx: GPU generations to build for, e.g. 8.6 or 8.6,8.9 (repeatable; "
                   "default 8.0,8.6,8.9,12.0,12.1; 7.5 opt-in, float16 only)")
    p.add_argument("--max-prefill", type=int, default=2048, help="TensorRT: longest prompt the engine takes")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.primitives.errors import UserError

    if a.quant is not None and a.quant not in QUANTS:
        raise UserError(f"--quant {a.quant} not supported for export; known: {', '.join(QUANTS)} "
                        "(llm-int8 is a load-time option of generate/chat)")
    if a.target not in TARGETS:
        raise UserError(f"--target {a.target} not supported; known: {', '.join(TARGETS)}")
    from pathlib import Path

    from edge_dlm.hub import resolve
    from edge_dlm.primitives.fsutil import recover

    out = Path(a.output)
    recover(out)  # what an interrupted export left beside it
    if (out.exists() or out.is_symlink()) and not a.force:  # before any work, not after it
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and not out.is_dir() and a.target != "gguf":
        raise UserError(f"{out} exists and is not an artifact directory; remove it or pick another -o")
    a.checkpoint = resolve(a.checkpoint)
    if a.target == "gguf":
        from edge_dlm.export.gguf import export_gguf

        if a.group_size != 64 or a.asymmetric or a.keep_head or a.calibrate or a.format != "edge-dlm":
            raise UserError("--target gguf writes llama.cpp's own formats (Q8_0 / Q4_0: symmetric blocks of 32); "
                            "drop --group-size, --asymmetric, --keep-head, --calibrate and --format")
        export_gguf(a.checkpoint, out, quant=a.quant, dtype=a.dtype, force=a.force)
        return 0
    if a.format != "edge-dlm" and a.target != "torch":
        raise UserError(f"--format {a.format} is a safetensors layout: use it with --target torch")
    if a.calibrate and (a.target != "torch" or a.quant is None):
        raise UserError("--calibrate calibrates --quant int4/int8 for --target torch")
    if a.target == "torch":
        if a.quant is None:
            raise UserError("nothing to export: pass --quant for a quantized artifact or "
                            "--target onnx|tensorrt|tensorrt-rtx")
        from edge_dlm.export.quantize import export_quantized
        from edge_dlm.model.quant import QuantSpec

        spec = QuantSpec(a.quant, group_size=a.group_size, symmetric=not a.asymmetric, head=not a.keep_head,
                         calibration="awq" if a.calibrate else None)
        export_quantized(a.checkpoint, a.output, spec, force=a.force, fmt=a.format)
        return 0
    if a.target == "onnx":
        from edge_dlm.export.onnx import export_onnx

        export_onnx(a.checkpoint, a.output, dtype=a.dtype or "float32", quant=a.quant, group_size=a.group_size,
                    symmetric=not a.asymmetric, force=a.force)
        return 0
    if a.quant == "nf4":
        raise UserError(f"{a.target} takes int8 or int4 weight-only quantization, not nf4")
    from edge_dlm.export.tensorrt import export_engine

    ccs = [c.strip() for arg in a.compute_capability or [] for c in arg.split(",") if c.strip()]
    export_engine(a.checkpoint, a.output, target=a.target, dtype=a.dtype or "float16", quant=a.quant,
                  group_size=a.group_size, compute_capabilities=ccs or None, max_prefill=a.max_prefill,
                  force=a.force)
    return 0
