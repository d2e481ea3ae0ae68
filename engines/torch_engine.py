"""The torch engine: `NLDModel` itself (CPU or CUDA, any dtype, quantized weights, Triton kernels)."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_dlm.model.weights import INDEX_FILE, SINGLE_FILE


def availability(path: Path, device: str) -> list[str]:
    reasons = []
    if not ((path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists()):
        reasons.append(f"{path.name} has no safetensors weights (an exported engine artifact?)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        reasons.append("no CUDA GPU visible to torch")
    return reasons


def versions() -> dict[str, str]:
    cuda = torch.version.cuda or "none"
    return {"torch": torch.__version__, "cuda": cuda}


def open(path: Path, device: torch.device, dtype: torch.dtype, lora: bool = True, quantize=None):  # noqa: A001
    """`quantize`: a `QuantSpec` applied as the weights load, one at a time (`load_model`)."""
    from edge_dlm.model.weights import load_model

    return load_model(path, dtype=dtype, device=device, lora=lora, quantize=quantize)
