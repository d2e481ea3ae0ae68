"""`edge-dlm export CKPT -o OUT [--quant ...] [--target ...]`."""

from __future__ import annotations

import argparse

QUANTS = ("int8", "int4", "nf4")
TARGETS = ("torch", "onnx", "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="source checkpoint directory (full precision)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    p.add_argument("--quant", help=f"weight-only quantization: {', '.join(QUANTS)}")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64 or 128 (default 64)")
    p.add_argument("--asymmetric", action="store_true", help="int8/int4 with a per-group minimum (default symmetric)")
    p.add_argument("--keep-head", action="store_true", help="leave diffusion_head in full precision")
    p.add_argument("--target", default="torch",
                   help="torch (safetensors for the torch engine), onnx or tensorrt (default torch)")
    p.add_argument("--dtype", default="float32", help="ONNX/TensorRT precision: float32, float16, bfloat16")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.errors import UserError

    if a.quant is not None and a.quant not in QUANTS:
        raise UserError(f"--quant {a.quant} not supported for export; known: {', '.join(QUANTS)} "
                        "(llm-int8 is a load-time option of generate/chat)")
    if a.target not in TARGETS:
        raise UserError(f"--target {a.target} not supported; known: {', '.join(TARGETS)}")
    if a.target == "torch":
        if a.quant is None:
            raise UserError("nothing to export: pass --quant for a quantized artifact or --target onnx|tensorrt")
        from edge_dlm.export.quantize import export_quantized
        from edge_dlm.quant import QuantSpec

        spec = QuantSpec(a.quant, group_size=a.group_size, symmetric=not a.asymmetric, head=not a.keep_head)
        export_quantized(a.checkpoint, a.output, spec, force=a.force)
        return 0
    raise UserError(f"--target {a.target} is not available in this version")
