"""Which device and precision a model runs on (`--device`, `--dtype`), and the peak memory a run took."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_dlm.primitives.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"device '{device}' not supported; known: auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu")
    return torch.device(device)


# On a CPU, `--dtype auto` keeps a bfloat16 checkpoint in bfloat16 when its weights are at least this
# large: no CPU cache holds them, every pass streams them from memory, and half the bytes through the
# bf16 kernel (`edge_dlm.kernels.cpu_matmul.Bf16Linear`) decode ~3x faster than float32 through torch
# (NLD-3B shape: `scripts/bench_cpu_dtype.py`, BENCHMARKS.md). A smaller model stays in cache, where
# float32 is as fast and exact.
CPU_BF16_BYTES = 512 << 20


def _large_bf16(path: Path) -> bool:
    """A checkpoint directory stored in bfloat16 whose safetensors hold at least `CPU_BF16_BYTES`."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16" and size >= CPU_BF16_BYTES


def resolve_dtype(dtype: str | None, device: torch.device, path: Path | None = None,
                  bf16_bytes: int | None = None) -> torch.dtype:
    """`--dtype`: auto is bfloat16 on CUDA; on a CPU float32, or bfloat16 for a large bfloat16 checkpoint
    at `path`, or a bfloat16 model of `bf16_bytes` about to be built (`CPU_BF16_BYTES`)."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        large = (path is not None and _large_bf16(path)) or (bf16_bytes or 0) >= CPU_BF16_BYTES
        return torch.bfloat16 if large else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' not supported; known: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA, else this process's peak resident set size."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
