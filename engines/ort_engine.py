"""The onnxruntime engine: runs the exported step graph (`export/onnx.py`) on CPU or CUDA.

The KV cache stays a torch `KVCache` on the host; each pass feeds the committed K/V and the
pattern's `[T, L+T]` mask, and writes the graph's new K/V into the cache's scratch slots.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from edge_dlm.primitives.attention import Attn
from edge_dlm.primitives.cache import KVCache
from edge_dlm.model.config import NLDConfig
from edge_dlm.primitives.errors import CheckpointError, install_hint
from edge_dlm.export.manifest import read_manifest

GRAPH_FILE = "model.onnx"
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def availability(path: Path, device: str) -> list[str]:
    reasons = []
    if importlib.util.find_spec("onnxruntime") is None:
        reasons.append(f"onnxruntime is not installed ({install_hint('onnx')})")
    elif device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reasons.append("onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)")
    if not (path / GRAPH_FILE).exists():
        reasons.append(f"{path.name} has no {GRAPH_FILE} (export one: edge-dlm export CKPT -o OUT --target onnx)")
    elif (dtype := (read_manifest(path) or {}).get("dtype", "float32")) not in NP_DTYPES:
        reasons.append(f"its graph is {dtype}, which onnxruntime does not run here (float32 and float16 only)")
    return reasons


def versions() -> dict[str, str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return {}
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "providers": ",".join(ort.get_available_providers())}


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, lora: bool = True) -> None:
        import onnxruntime as ort

        self.config = NLDConfig.from_file(path / "config.json")
        manifest = read_manifest(path)
        if manifest is None:
            raise CheckpointError(f"{path} has no manifest.json; re-export it with edge-dlm export --target onnx")
        self.dtype_name = manifest.get("dtype", "float32")
        graph_lora = bool(manifest.get("graph", {}).get("lora"))
        self.np_dtype = NP_DTYPES[self.dtype_name]
        self.dtype = getattr(torch, self.dtype_name)
        self.device = device
        providers = (["CUDAExecutionProvider"] if device.type == "cuda" else []) + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # do not fight torch for 2 cores
        try:
            self.session = ort.InferenceSession(str(path / GRAPH_FILE), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CheckpointError(f"{path / GRAPH_FILE} cannot be loaded by onnxruntime "
                                  f"({str(exc).splitlines()[0][:200]}); is it truncated? re-export it") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.has_lora = lora and graph_lora and "use_lora" in self.inputs

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, dtype=self.dtype)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache: KVCache, attn: Attn,
                 use_lora: bool = False, last_only: bool = False) -> torch.Tensor:
        t, cached = tokens.shape[1], cache.length
        mask = attn.full_mask(cached, t)
        if mask is None:
            mask = torch.ones(t, cached + t, dtype=torch.bool)
        feeds = {"input_ids": tokens.cpu().numpy(), "position_ids": positions.cpu().numpy(),
                 "attn_mask": mask.numpy(),
                 "past_keys": np.ascontiguousarray(cache.k[:, :, :cached].numpy()),
                 "past_values": np.ascontiguousarray(cache.v[:, :, :cached].numpy())}
        if "use_lora" in self.inputs:
            feeds["use_lora"] = np.array(1.0 if use_lora and self.has_lora else 0.0, dtype=self.np_dtype)
        logits, new_k, new_v = self.session.run(None, feeds)
        cache.write_all(torch.from_numpy(new_k), torch.from_numpy(new_v))
        logits = torch.from_numpy(logits)
        return logits[:, -1:] if last_only else logits  # one graph for every pass: it computes them all

    def close(self) -> None:
        self.session = None


def open(path: Path, device: torch.device, dtype: torch.dtype, lora: bool = True) -> OrtEngine:  # noqa: A001
    return OrtEngine(path, device, lora)
