"""The TensorRT engine: runs an engine built by `edge-dlm export --target tensorrt` on its GPU.

Before TensorRT is even imported, `check_artifact` verifies the plan file against the manifest
(present, same size and sha256: not truncated or corrupt) and that it was built for this GPU and
this TensorRT version; each failure is one actionable line. Inference keeps the KV cache as torch
CUDA tensors: each pass picks the optimization profile admitting (T, L), sets the input shapes and
tensor addresses, and runs `execute_async_v3` on torch's current stream. Written against the
TensorRT 10 Python API; it cannot run on CI (no TensorRT there), so it is untested here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from edge_dlm.attention import Attn
from edge_dlm.cache import KVCache
from edge_dlm.config import NLDConfig
from edge_dlm.errors import CheckpointError
from edge_dlm.export.manifest import read_manifest


def manifest_trt(path: Path) -> dict | None:
    return (read_manifest(path) or {}).get("tensorrt")


def check_artifact(path: Path, gpu: str | None, trt_version: str | None) -> list[str]:
    """Reasons the TensorRT engine in `path` cannot run with this GPU / TensorRT (empty: it can)."""
    from edge_dlm.export.manifest import file_sha256

    info = manifest_trt(path)
    if info is None:
        return [f"{path.name} has no TensorRT engine (build one: edge-dlm export CKPT -o OUT --target tensorrt)"]
    plan = path / info["engine"]
    if not plan.exists():
        return [f"the engine file {info['engine']} is missing from {path}; rebuild it"]
    if file_sha256(plan) != info["engine_sha256"]:
        return [f"the engine file {plan.name} is corrupt or truncated (checksum mismatch); rebuild it with --force"]
    reasons = []
    if gpu is not None and gpu != info["gpu"]:
        reasons.append(f"the engine was built for {info['gpu']}, this GPU is {gpu}; rebuild it here")
    if trt_version is not None and trt_version != info["version"]:
        reasons.append(f"the engine was built with TensorRT {info['version']}, installed is {trt_version}; rebuild it")
    return reasons


def availability(path: Path, device: str) -> list[str]:
    if manifest_trt(path) is None:
        return [f"{path.name} has no TensorRT engine"]
    broken = check_artifact(path, None, None)  # integrity first: it needs neither TensorRT nor a GPU
    if broken:
        return broken
    if importlib.util.find_spec("tensorrt") is None:
        return ["TensorRT is not installed (see NVIDIA's install guide; not installable on CI)"]
    if not torch.cuda.is_available() or not device.startswith("cuda"):
        return ["TensorRT engines run on a CUDA GPU (--device cuda)"]
    import tensorrt as trt

    return check_artifact(path, torch.cuda.get_device_name(0), trt.__version__)


def versions() -> dict[str, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return {}
    import tensorrt as trt

    return {"tensorrt": trt.__version__}


class TrtEngine:
    name = "tensorrt"

    def __init__(self, path: Path, device: torch.device, lora: bool = True) -> None:
        import tensorrt as trt

        reasons = check_artifact(path, torch.cuda.get_device_name(0), trt.__version__)
        if reasons:
            raise CheckpointError(reasons[0])
        manifest = read_manifest(path)
        info = manifest["tensorrt"]
        self.config = NLDConfig.from_file(path / "config.json")
        self.profiles = info["profiles"]
        self.device = device
        self.dtype = torch.float32 if manifest["dtype"] == "float32" else torch.float16
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((path / info["engine"]).read_bytes())
        if self.engine is None:
            raise CheckpointError(f"TensorRT could not deserialize {info['engine']}; rebuild it with --force")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.has_lora = lora and "use_lora" in names
        self.names = set(names)
        self.active_profile = -1

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, dtype=self.dtype,
                       device=self.device)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache: KVCache, attn: Attn,
                 use_lora: bool = False) -> torch.Tensor:
        from edge_dlm.export.tensorrt import profile_for

        t, cached = tokens.shape[1], cache.length
        prof = profile_for(self.profiles, t, cached)
        if prof is None:
            raise RuntimeError(f"no optimization profile admits T={t} over {cached} cached tokens")
        stream = torch.cuda.current_stream(self.device)
        if prof != self.active_profile:
            self.context.set_optimization_profile_async(prof, stream.cuda_stream)
            self.active_profile = prof
        mask = attn.full_mask(cached, t, self.device)
        if mask is None:
            mask = torch.ones(t, cached + t, dtype=torch.bool, device=self.device)
        c = self.config
        inputs = {"input_ids": tokens.to(self.device).contiguous(), "position_ids": positions.to(self.device).contiguous(),
                  "attn_mask": mask.contiguous(), "past_keys": cache.k[:, :, :cached].contiguous(),
                  "past_values": cache.v[:, :, :cached].contiguous()}
        if "use_lora" in self.names:
            inputs["use_lora"] = torch.tensor(1.0 if use_lora and self.has_lora else 0.0, dtype=self.dtype,
                                              device=self.device)
        outputs = {"logits": torch.empty(1, t, c.vocab_size, dtype=self.dtype, device=self.device),
                   "new_keys": torch.empty(c.num_hidden_layers, c.num_key_value_heads, t, c.head_dim,
                                           dtype=self.dtype, device=self.device)}
        outputs["new_values"] = torch.empty_like(outputs["new_keys"])
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        cache.write_all(outputs["new_keys"], outputs["new_values"])
        return outputs["logits"]

    def close(self) -> None:
        self.context = self.engine = self.runtime = None


def open(path: Path, device: torch.device, dtype: torch.dtype, lora: bool = True) -> TrtEngine:  # noqa: A001
    return TrtEngine(path, device, lora)
