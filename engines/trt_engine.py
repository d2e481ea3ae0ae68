"""The TensorRT engines: run an engine built by `edge-dlm export --target tensorrt|tensorrt-rtx`.

One implementation serves both flavours (`edge_dlm.export.tensorrt.FLAVOURS`); `trt_rtx_engine`
binds it to TensorRT for RTX. Before the GPU is touched, `check_artifact` verifies the plan file
against the manifest (present, same size and sha256: not truncated or corrupt) and the installed
TensorRT version; then the GPU: for datacenter TensorRT the very GPU the engine was built on, for
TensorRT for RTX a compute capability among the engine's targets (never Hopper), and the library's
own header check (`Runtime.get_engine_validity`, which needs no GPU to spot a malformed plan).

Inference keeps the KV cache as torch CUDA tensors: each pass picks the optimization profile
admitting (T, L), sets the input shapes and tensor addresses and runs `execute_async_v3` on torch's
current stream. TensorRT for RTX compiles kernels just in time on first use; its runtime cache is
loaded from and saved to the user cache directory, so that cost is paid once per engine and GPU.
Running an engine needs an NVIDIA GPU of a supported kind: that part is untested on CI.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
from pathlib import Path

import torch

from edge_dlm.primitives.attention import Attn
from edge_dlm.primitives.cache import KVCache
from edge_dlm.model.config import NLDConfig
from edge_dlm.primitives.errors import CheckpointError
from edge_dlm.export.manifest import read_manifest
from edge_dlm.export.tensorrt import TENSORRT, Flavour, user_cache

# TensorRT for RTX's `EngineInvalidityDiagnostics` bits -> what the user should do
DIAGNOSTICS = {
    "VERSION_MISMATCH": "it was built by another TensorRT for RTX version; rebuild it",
    "UNSUPPORTED_CC": "this GPU's compute capability is not among the engine's targets; rebuild with "
                      "--compute-capability for it",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for it; update the driver",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is too old for it; update CUDA",
    "INSUFFICIENT_GPU_MEMORY": "the GPU does not have enough free memory for it",
    "MALFORMED_ENGINE": "the file is not a valid TensorRT for RTX engine (malformed header); rebuild it",
}


def manifest_section(path: Path, fl: Flavour) -> dict | None:
    return (read_manifest(path) or {}).get(fl.name)


def gpu_identity() -> tuple[str, str] | None:
    """(name, compute capability) of the current CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def check_artifact(path: Path, gpu: tuple[str, str] | None, version: str | None,
                   fl: Flavour = TENSORRT) -> list[str]:
    """Reasons the engine in `path` cannot run on `gpu` (name, cc) with TensorRT `version` (empty: it can).

    `gpu` / `version` None skip those checks (integrity alone needs neither TensorRT nor a GPU).
    """
    from edge_dlm.export.manifest import file_sha256

    info = manifest_section(path, fl)
    if info is None:
        return [f"{path.name} has no {fl.title} engine (build one: edge-dlm export CKPT -o OUT --target {fl.name})"]
    plan = path / info["engine"]
    if not plan.exists():
        return [f"the engine file {info['engine']} is missing from {path}; rebuild it"]
    if plan.stat().st_size != info.get("engine_bytes", plan.stat().st_size) or \
            file_sha256(plan) != info["engine_sha256"]:
        return [f"the engine file {plan.name} is corrupt or truncated (checksum mismatch); rebuild it with --force"]
    if version is not None and version != info["version"]:
        return [f"the engine was built with {fl.title} {info['version']}, installed is {version}; rebuild it"]
    if gpu is None:
        return []
    name, cc = gpu
    if fl.local_gpu:
        return [] if name == info["gpu"] else [f"the engine was built for {info['gpu']}, this GPU is {name}; "
                                                "rebuild it here"]
    if cc == "9.0":
        return [f"{name} is a Hopper GPU (compute capability 9.0), which {fl.title} does not support; "
                "use --target tensorrt or the torch engine there"]
    if cc not in info["compute_capabilities"]:
        return [f"the engine targets compute capability {', '.join(info['compute_capabilities'])}, this GPU "
                f"({name}) is {cc}; rebuild it with --compute-capability {cc}"]
    return []


def plan_diagnostics(trt, plan: Path) -> list[str]:
    """TensorRT for RTX's own verdict on a plan's header (`get_engine_validity`), as reasons.

    Without a GPU the library cannot compare the engine with the device, but it still reads the header:
    a malformed plan is reported either way.
    """

    class Quiet(trt.ILogger):  # the check logs a fatal-level line when no GPU can be queried
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            pass

    runtime = trt.Runtime(Quiet())
    with plan.open("rb") as f:
        header = f.read(runtime.engine_header_size)
    _, diag = runtime.get_engine_validity(header)
    return [why for flag, why in DIAGNOSTICS.items() if int(diag) & int(trt.EngineInvalidityDiagnostics.__members__[flag])]


def availability(path: Path, device: str, fl: Flavour = TENSORRT) -> list[str]:
    if manifest_section(path, fl) is None:
        return [f"{path.name} has no {fl.title} engine"]
    broken = check_artifact(path, None, None, fl)  # integrity first: it needs neither TensorRT nor a GPU
    if broken:
        return broken
    if importlib.util.find_spec(fl.module) is None:
        return [f"{fl.title} is not installed ({fl.install})"]
    trt = importlib.import_module(fl.module)
    reasons = check_artifact(path, None, trt.__version__, fl)
    if not reasons and fl.strongly_typed:
        reasons = plan_diagnostics(trt, path / manifest_section(path, fl)["engine"])
    if reasons:
        return reasons
    gpu = gpu_identity()
    if gpu is None or not device.startswith("cuda"):
        return [f"{fl.title} engines run on an NVIDIA GPU (--device cuda), and none is visible"]
    return check_artifact(path, gpu, trt.__version__, fl)


def versions(fl: Flavour = TENSORRT) -> dict[str, str]:
    if importlib.util.find_spec(fl.module) is None:
        return {}
    return {fl.name: importlib.import_module(fl.module).__version__}


class TrtEngine:
    def __init__(self, path: Path, device: torch.device, lora: bool = True, fl: Flavour = TENSORRT) -> None:
        trt = importlib.import_module(fl.module)
        reasons = check_artifact(path, gpu_identity(), trt.__version__, fl)
        if reasons:
            raise CheckpointError(reasons[0])
        manifest = read_manifest(path)
        info = manifest[fl.name]
        self.name = fl.name
        self.config = NLDConfig.from_file(path / "config.json")
        self.profiles = info["profiles"]
        self.device = device
        self.dtype = getattr(torch, manifest["dtype"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((path / info["engine"]).read_bytes())
        if self.engine is None:
            raise CheckpointError(f"{fl.title} could not deserialize {info['engine']}; rebuild it with --force")
        self.runtime_cache = self.cache_file = None
        if fl.strongly_typed:  # JIT-compiled kernels: keep them across runs
            config = self.engine.create_runtime_config()
            self.runtime_cache = config.create_runtime_cache()
            self.cache_file = user_cache(fl, f"runtime-{info['engine_sha256'][:16]}-{gpu_identity()[1]}.cache")
            if self.cache_file.exists():
                self.runtime_cache.deserialize(self.cache_file.read_bytes())
            config.set_runtime_cache(self.runtime_cache)
            self.context = self.engine.create_execution_context(config)
            atexit.register(self.save_runtime_cache)
        else:
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.has_lora = lora and "use_lora" in names
        self.names = set(names)
        self.active_profile = -1

    def save_runtime_cache(self) -> None:
        if self.runtime_cache is None:
            return
        from edge_dlm.primitives.fsutil import atomic_write_bytes

        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.cache_file, bytes(self.runtime_cache.serialize()))

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, dtype=self.dtype,
                       device=self.device)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, *, cache: KVCache, attn: Attn,
                 use_lora: bool = False, last_only: bool = False) -> torch.Tensor:
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
        return outputs["logits"][:, -1:] if last_only else outputs["logits"]

    def close(self) -> None:
        self.save_runtime_cache()
        atexit.unregister(self.save_runtime_cache)
        self.runtime_cache = self.context = self.engine = self.runtime = None


def open(path: Path, device: torch.device, dtype: torch.dtype, lora: bool = True,  # noqa: A001
         fl: Flavour = TENSORRT) -> TrtEngine:
    return TrtEngine(path, device, lora, fl)
