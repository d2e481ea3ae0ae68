"""The TensorRT for RTX engine (`--engine tensorrt-rtx`): `trt_engine` bound to the RTX flavour.

Runs engines from `edge-dlm export --target tensorrt-rtx` on Ampere, Ada and Blackwell RTX GPUs
(the compute capabilities the engine was built for; Hopper is not supported by TensorRT for RTX),
with the just-in-time runtime cache kept under the user cache directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_dlm.engines import trt_engine
from edge_dlm.export.tensorrt import TENSORRT_RTX


def availability(path: Path, device: str) -> list[str]:
    return trt_engine.availability(path, device, TENSORRT_RTX)


def versions() -> dict[str, str]:
    return trt_engine.versions(TENSORRT_RTX)


def open(path: Path, device: torch.device, dtype: torch.dtype, lora: bool = True):  # noqa: A001
    return trt_engine.open(path, device, dtype, lora, TENSORRT_RTX)
