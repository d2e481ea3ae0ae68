"""`edge-dlm export --target tensorrt`: the ONNX step graph -> a TensorRT engine for this GPU.

Steps: export the step graph (`export/onnx.py`; weight-only int4/int8 as QDQ `DequantizeLinear`,
which TensorRT's parser takes, instead of onnxruntime's `MatMulNBits`), rewrite the few operators
TensorRT's parser lacks (`Reciprocal` -> `Div`), check every operator against
`tensorrt_onnx_ops.txt`, then build with one optimization profile per token count the modes use:

    T = 1                AR steps
    T = B                diffusion denoising, commit passes, LinearSpec draft and verify
    T = B(B+1)           QuadraticSpec cycles
    T in [1, prefill]    prompts (and QuadraticSpec's first pass, prompt + B)

each with the cached length L in [0, context - T]. A timing cache (in the user cache directory)
makes rebuilds fast; engines are cached under a key of the source checksum, precision, GPU,
compute capability, TensorRT version and profiles. TensorRT itself is imported only here and in
`engines/trt_engine.py`, written against the TensorRT 10 Python API (it cannot be installed on CI:
see `platform.md`); every step before `build_serialized_network` is tested without it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from edge_dlm.errors import UserError

OPS_FILE = Path(__file__).with_name("tensorrt_onnx_ops.txt")
PRECISIONS = ("float32", "float16", "bfloat16", "int8", "int4")
ENGINE_PREFIX = "engine-"


def supported_ops() -> set[str]:
    lines = OPS_FILE.read_text(encoding="utf-8").splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def graph_ops(model) -> set[str]:
    """Operator types of an ONNX ModelProto (including inside If/Loop subgraphs)."""
    ops = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)

    walk(model.graph)
    return ops


def unsupported_ops(model) -> list[str]:
    return sorted(graph_ops(model) - supported_ops())


def make_tensorrt_compatible(model):
    """Rewrite operators TensorRT's matrix lacks into equivalents it has (in place; returns model)."""
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    one = "edge_dlm_one"
    used = False
    for node in model.graph.node:
        if node.op_type == "Reciprocal":  # 1 / x
            node.op_type = "Div"
            node.input.insert(0, one)
            used = True
    if used:
        elem = onnx.TensorProto.FLOAT
        for init in model.graph.initializer:  # match the graph's float type
            if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                elem = init.data_type
                break
        value = numpy_helper.from_array(np.array(1.0, dtype=helper.tensor_dtype_to_np_dtype(elem)), one)
        model.graph.initializer.append(value)
    return model


def profiles(block: int, context: int, max_prefill: int | None = None) -> list[dict[str, tuple[int, int, int]]]:
    """One {name: (min, opt, max)} dict per optimization profile, over token count T and cache L.

    Shapes: input_ids / position_ids [1, T], attn_mask [T, L + T], past_* [layers, nkv, L, hd]
    (only the dynamic dimensions are listed: "T" and "L").
    """
    max_prefill = min(max_prefill or 2048, context)
    fixed = sorted({1, block, block * (block + 1)})
    out = [{"T": (t, t, t), "L": (0, min(1024, context - t), context - t)} for t in fixed if t < context]
    out.append({"T": (1, min(256, max_prefill), max_prefill), "L": (0, 0, context - max_prefill)})
    return out


def profile_for(profs: list[dict], t: int, cached: int) -> int | None:
    """Index of the first profile that admits a pass of `t` tokens over `cached` cached ones."""
    for i, p in enumerate(profs):
        (tmin, _, tmax), (lmin, _, lmax) = p["T"], p["L"]
        if tmin <= t <= tmax and lmin <= cached <= lmax:
            return i
    return None


def cache_key(*, source_sha256: str, precision: str, gpu: str, compute_capability: str,
              tensorrt_version: str, profs: list[dict]) -> str:
    """Engine cache key: changes when any input to the build changes."""
    blob = json.dumps({"source": source_sha256, "precision": precision, "gpu": gpu,
                       "cc": compute_capability, "trt": tensorrt_version, "profiles": profs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("--target tensorrt needs TensorRT, which is not installed: install it from NVIDIA "
                        "(pip install tensorrt-cu12 with access to pypi.nvidia.com) on a machine with a GPU; "
                        "--target onnx works without it") from None
    return trt


def current_gpu() -> tuple[str, str]:
    """(name, compute capability) of CUDA device 0, or a one-line error without a GPU."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--target tensorrt builds for the local GPU, and no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def _progress_monitor(trt):
    class Progress(trt.IProgressMonitor):
        """Prints TensorRT's build phases as a one-line progress bar on stderr."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[int, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = (0, max(num_steps, 1))
            self._draw(phase_name)

        def step_complete(self, phase_name, step):
            self.phases[phase_name] = (step + 1, self.phases.get(phase_name, (0, 1))[1])
            self._draw(phase_name)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)
            print(file=sys.stderr)

        def _draw(self, phase):
            done, total = self.phases[phase]
            bar = "#" * int(30 * done / total)
            print(f"\r  {phase[:32]:<32} [{bar:<30}] {done}/{total}", end="", file=sys.stderr, flush=True)

    return Progress()


def build_engine(onnx_path: Path, plan_path: Path, *, precision: str, profs: list[dict], cfg,
                 timing_cache: Path, log=print) -> None:
    """Parse `onnx_path` and build a serialized engine into `plan_path` (TensorRT 10 API)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    if precision == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bfloat16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision in ("int8", "int4"):  # weight-only: QDQ weights, activations in fp16
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)
    layers, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    for p in profs:
        prof = builder.create_optimization_profile()
        (t0, t1, t2), (l0, l1, l2) = p["T"], p["L"]
        for name in ("input_ids", "position_ids"):
            prof.set_shape(name, (1, t0), (1, t1), (1, t2))
        prof.set_shape("attn_mask", (t0, l0 + t0), (t1, l1 + t1), (t2, l2 + t2))
        for name in ("past_keys", "past_values"):
            prof.set_shape(name, (layers, nkv, l0, hd), (layers, nkv, l1, hd), (layers, nkv, l2, hd))
        config.add_optimization_profile(prof)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    tcache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(tcache, ignore_mismatch=False)
    config.progress_monitor = _progress_monitor(trt)
    log(f"building a {precision} TensorRT engine with {len(profs)} optimization profiles (minutes)")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see the messages above)")
    plan_path.write_bytes(bytes(plan))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log(f"engine built in {time.perf_counter() - t0:.0f} s")


def timing_cache_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("edge-dlm")) / "tensorrt" / "timing.cache"


def export_tensorrt(src: str | Path, out: str | Path, *, precision: str = "float16", group_size: int = 64,
                    max_prefill: int = 2048, force: bool = False, log=print) -> dict:
    """Export `src` to an artifact holding the TensorRT-ready ONNX graph and an engine for this GPU."""
    import onnx

    from edge_dlm.config import NLDConfig
    from edge_dlm.export.manifest import file_sha256, source_checksum, tool_versions, write_manifest
    from edge_dlm.export.onnx import GRAPH_FILE, export_graph, require_onnx
    from edge_dlm.export.quantize import check_source, copy_side_files
    from edge_dlm.fsutil import atomic_dir
    from edge_dlm.weights import load_model

    if precision not in PRECISIONS:
        raise UserError(f"TensorRT precision {precision} not supported; known: {', '.join(PRECISIONS)}")
    require_onnx()
    trt = require_tensorrt()  # fail before any work when it cannot finish
    gpu, cc = current_gpu()
    src = Path(src)
    check_source(src)
    cfg = NLDConfig.from_file(src / "config.json")
    profs = profiles(cfg.block_size, cfg.max_position_embeddings, max_prefill)
    key = cache_key(source_sha256=source_checksum(src), precision=precision, gpu=gpu, compute_capability=cc,
                    tensorrt_version=trt.__version__, profs=profs)
    t0 = time.perf_counter()
    import torch

    dtype = torch.float32 if precision == "float32" else torch.float16
    with atomic_dir(out, force=force) as tmp:
        log(f"[1/3] tracing the step graph ({precision})")
        export_graph(load_model(src, dtype=dtype), tmp / GRAPH_FILE, dtype)
        if precision in ("int8", "int4"):
            quantize_qdq(tmp / GRAPH_FILE, 8 if precision == "int8" else 4, group_size)
        model = make_tensorrt_compatible(onnx.load(str(tmp / GRAPH_FILE)))
        bad = unsupported_ops(model)
        if bad:
            raise UserError(f"the graph uses operators TensorRT's parser does not support: {', '.join(bad)}")
        onnx.save(model, str(tmp / GRAPH_FILE))
        log("[2/3] TensorRT build")
        plan = tmp / f"{ENGINE_PREFIX}{key[:16]}.plan"
        build_engine(tmp / GRAPH_FILE, plan, precision=precision, profs=profs, cfg=cfg,
                     timing_cache=timing_cache_path(), log=log)
        log("[3/3] config, tokenizer, manifest")
        (tmp / "config.json").write_text((src / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
        copy_side_files(src, tmp)
        manifest = write_manifest(
            tmp, src, kind="tensorrt", targets=["tensorrt", "onnx"], precision=precision,
            dtype="float32" if precision == "float32" else "float16",
            tensorrt={"engine": plan.name, "engine_sha256": file_sha256(plan), "cache_key": key, "gpu": gpu,
                      "compute_capability": cc, "version": trt.__version__, "profiles": profs},
            tool_versions=tool_versions("onnx", "onnxruntime", "tensorrt"),
            export_seconds=round(time.perf_counter() - t0, 3))
    return manifest


def quantize_qdq(path: Path, bits: int, group_size: int) -> None:
    """Weight-only QDQ: each constant-weight MatMul reads `DequantizeLinear(q, scale)` (zero point 0).

    int4: block-wise along the input dimension (onnxruntime's quantizer, QDQ format, opset 21).
    int8: per output channel, written here (onnxruntime's quantizer has no 8-bit QDQ).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    if bits == 4:
        q = MatMulNBitsQuantizer(model, bits=4, block_size=group_size, is_symmetric=True,
                                 quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(path), use_external_data_format=False)
        return
    onnx.save(int8_per_channel_qdq(model), str(path))


def int8_per_channel_qdq(model):
    """Replace each MatMul's constant weight `B [K, N]` by DequantizeLinear(int8 q, scale [N], axis=1)."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2:
            b = numpy_helper.to_array(w)
            scale = (np.abs(b).max(axis=0) / 127.0).clip(min=1e-10).astype(b.dtype)
            q = np.clip(np.round(b / scale), -127, 127).astype(np.int8)
            base = w.name
            model.graph.initializer.remove(w)
            model.graph.initializer.extend([numpy_helper.from_array(q, base + "_q"),
                                            numpy_helper.from_array(scale, base + "_scale"),
                                            numpy_helper.from_array(np.zeros_like(scale, np.int8), base + "_zp")])
            new_nodes.append(helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zp"],
                                              [base + "_dq"], axis=1, name=base + "_DequantizeLinear"))
            node.input[1] = base + "_dq"
            del inits[base]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model
