"""`edge-dlm export --target tensorrt|tensorrt-rtx`: the ONNX step graph -> a TensorRT engine.

One builder serves both flavours of TensorRT (`FLAVOURS`), which share the Python API:

- `tensorrt` (datacenter TensorRT 10): builds for the GPU in this machine; precision by builder flags.
- `tensorrt-rtx` (TensorRT for RTX, `tensorrt_rtx`): builds ahead of time on any machine, no GPU
  needed, for a list of compute capabilities (Ampere 8.0/8.6, Ada 8.9, Blackwell RTX 12.0/12.1;
  Turing 7.5 opt-in, float16 only; no Hopper), and specialises kernels just in time on the user's
  GPU. Its networks are strongly typed: the precision is the graph's own (an fp16/bf16 graph, QDQ
  weights), there are no precision flags.

Steps: export the step graph (`export/onnx.py`) in the engine's dtype; weight-only int4/int8 as QDQ
`DequantizeLinear` (which both parsers take) instead of onnxruntime's `MatMulNBits`; rewrite the few
operators the parser lacks (`Reciprocal` -> `Div`); check every operator against
`tensorrt_onnx_ops.txt`; then build with one optimization profile per token count the modes use:

    T = 1                AR steps
    T = B                diffusion denoising, commit passes, LinearSpec draft and verify
    T = B(B+1)           QuadraticSpec cycles
    T in [1, prefill]    prompts (and QuadraticSpec's first pass, prompt + B)

each with the cached length L in [0, context - T]. A timing cache (in the user cache directory)
makes rebuilds fast; the engine's cache key covers the source checksum, precision, targets, TensorRT
version and profiles. TensorRT is imported only here and in `engines/trt_engine.py`. Datacenter
TensorRT cannot be installed on CI (`platform.md`); TensorRT for RTX can, and CI builds real engines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from edge_dlm.primitives.errors import UserError, install_hint

OPS_FILE = Path(__file__).with_name("tensorrt_onnx_ops.txt")
DTYPES = ("float16", "bfloat16", "float32")
QUANTS = {"int4": 4, "int8": 8}
ENGINE_PREFIX = "engine-"


@dataclasses.dataclass(frozen=True)
class Flavour:
    """What differs between the two TensorRTs; everything else is one code path."""

    name: str  # --target / --engine name and the manifest key
    module: str  # the Python module
    title: str
    install: str  # how to get it, for the one-line error
    strongly_typed: bool  # precision from the graph (TensorRT-RTX) instead of builder flags
    local_gpu: bool  # builds for the GPU of this machine (datacenter TensorRT)


TENSORRT = Flavour("tensorrt", "tensorrt", "TensorRT",
                   "install it from NVIDIA (pip install tensorrt-cu12 with access to pypi.nvidia.com) on a "
                   "machine with a GPU; --target tensorrt-rtx and --target onnx work without it",
                   strongly_typed=False, local_gpu=True)
TENSORRT_RTX = Flavour("tensorrt-rtx", "tensorrt_rtx", "TensorRT for RTX",
                       f"{install_hint('tensorrt-rtx')} (the tensorrt-rtx-cu13 package)",
                       strongly_typed=True, local_gpu=False)
FLAVOURS = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}

# TensorRT for RTX targets: compute capability -> its `ComputeCapability` member.
RTX_TARGETS = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0", "12.1")  # 7.5 (Turing) is opt-in and fp16 only


def flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise UserError(f"TensorRT flavour {name} not supported; known: {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


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
    """Rewrite operators TensorRT's matrix lacks into equivalents it has (in place; returns model).

    `Reciprocal(x)` -> `Div(1, x)`, the constant typed like `x`: a strongly typed network (TensorRT
    for RTX) refuses mixed operands, and the RMSNorm's rsqrt runs in float32 inside an fp16 graph.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    recips = [n for n in model.graph.node if n.op_type == "Reciprocal"]
    if not recips:
        return model
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    consts: dict[int, str] = {}
    for node in recips:  # 1 / x
        elem = types.get(node.input[0]) or onnx.TensorProto.FLOAT
        if elem not in consts:
            consts[elem] = f"edge_dlm_one_{onnx.TensorProto.DataType.Name(elem).lower()}"
            value = np.array(1.0, dtype=helper.tensor_dtype_to_np_dtype(elem))
            model.graph.initializer.append(numpy_helper.from_array(value, consts[elem]))
        node.op_type = "Div"
        node.input.insert(0, consts[elem])
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


def cache_key(*, flavour: str, source_sha256: str, precision: str, targets: list[str], version: str,
              profs: list[dict]) -> str:
    """Engine cache key: changes when any input to the build changes (targets: GPU + compute capability
    for TensorRT, the compute-capability list for TensorRT for RTX)."""
    blob = json.dumps({"flavour": flavour, "source": source_sha256, "precision": precision, "targets": targets,
                       "version": version, "profiles": profs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def require_tensorrt(fl: Flavour = TENSORRT):
    """The flavour's module, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(fl.module)
    except ImportError:
        raise UserError(f"--target {fl.name} needs {fl.title}, which is not installed: {fl.install}") from None


def current_gpu() -> tuple[str, str]:
    """(name, compute capability) of CUDA device 0, or a one-line error without a GPU."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--target tensorrt builds for the local GPU, and no CUDA GPU is visible; "
                        "--target tensorrt-rtx builds without one")
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def rtx_targets(requested: list[str] | None, dtype: str, quant: str | None) -> list[str]:
    """The compute capabilities a TensorRT-RTX engine is built for (validated, in a stable order)."""
    ccs = list(dict.fromkeys(requested or RTX_DEFAULT_TARGETS))
    for cc in ccs:
        if cc == "9.0":
            raise UserError("compute capability 9.0 (Hopper: H100, H200) is not supported by TensorRT for RTX; "
                            "build with --target tensorrt on that machine")
        if cc not in RTX_TARGETS:
            raise UserError(f"--compute-capability {cc} not supported by TensorRT for RTX; "
                            f"known: {', '.join(RTX_TARGETS)}")
    if "7.5" in ccs and (dtype != "float16" or quant):
        raise UserError("compute capability 7.5 (Turing) takes float16 engines only; drop 7.5 or --quant/--dtype")
    return sorted(ccs, key=lambda c: tuple(map(int, c.split("."))))


def _progress_monitor(trt):
    class Progress(trt.IProgressMonitor):
        """Draws TensorRT's top-level build phases as a one-line progress bar on stderr."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.top: set[str] = set()
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:  # nested phases would interleave on one line
                self.top.add(phase_name)
                self.steps[phase_name] = max(num_steps, 1)
                self._draw(phase_name, 0)

        def step_complete(self, phase_name, step):
            if phase_name in self.top:
                self._draw(phase_name, step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            if phase_name in self.top:
                self._draw(phase_name, self.steps[phase_name])  # finished: full, whatever steps it reported
                self.top.discard(phase_name)
                print(file=sys.stderr)

        def _draw(self, phase, done):
            total = self.steps[phase]
            bar = "#" * int(30 * done / total)
            print(f"\r  {phase[:32]:<32} [{bar:<30}] {done}/{total}", end="", file=sys.stderr, flush=True)

    return Progress()


def build_engine(fl: Flavour, onnx_path: Path, plan_path: Path, *, dtype: str, quant: str | None,
                 targets: list[str], profs: list[dict], cfg, timing_cache: Path, log=print) -> float:
    """Parse `onnx_path` and build a serialized engine into `plan_path`; returns the build seconds."""
    from edge_dlm.primitives.fsutil import atomic_write_bytes

    trt = require_tensorrt(fl)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch; TensorRT for RTX networks are strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise UserError(f"{fl.title} could not parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    if fl.strongly_typed:
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_TARGETS[cc]), i)
    else:  # datacenter TensorRT: weakly typed, precision by flags; QDQ weights need INT8 on
        if dtype in ("float16", "bfloat16"):
            config.set_flag(trt.BuilderFlag.FP16 if dtype == "float16" else trt.BuilderFlag.BF16)
        if quant:
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
    timed = not fl.strongly_typed  # TensorRT for RTX times nothing ahead of time: no timing cache
    if timed:
        cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=True)
    config.progress_monitor = _progress_monitor(trt)
    log(f"building a {quant or dtype} {fl.title} engine for {', '.join(targets)} "
        f"with {len(profs)} optimization profiles")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{fl.title} failed to build the engine (see the messages above)")
    seconds = time.perf_counter() - t0
    plan_path.write_bytes(bytes(plan))
    if timed:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    log(f"engine built in {seconds:.1f} s ({plan_path.stat().st_size / 2**20:.1f} MiB)")
    return seconds


def user_cache(fl: Flavour, name: str) -> Path:
    """A file in edge-dlm's user cache directory for this flavour (timing cache, runtime cache)."""
    from edge_dlm.primitives.fsutil import cache_root

    return cache_root() / fl.name / name


def export_engine(src: str | Path, out: str | Path, *, target: str = "tensorrt", dtype: str = "float16",
                  quant: str | None = None, group_size: int = 64, compute_capabilities: list[str] | None = None,
                  max_prefill: int = 2048, force: bool = False, log=print) -> dict:
    """Export `src` to an artifact holding the TensorRT-ready ONNX graph and an engine; returns the manifest.

    `target` "tensorrt" builds for this machine's GPU; "tensorrt-rtx" for `compute_capabilities`
    (default: every RTX target but Turing), on any machine.
    """
    import onnx
    import torch

    from edge_dlm.model.config import NLDConfig
    from edge_dlm.export.manifest import file_sha256, source_checksum, tool_versions, write_manifest
    from edge_dlm.export.onnx import GRAPH_FILE, check_export_args, export_graph, graph_inputs, require_onnx
    from edge_dlm.export.quantize import check_source, copy_side_files
    from edge_dlm.primitives.fsutil import atomic_dir
    from edge_dlm.model.weights import LORA_DIR, load_model

    fl = flavour(target)
    check_export_args(fl.name, dtype, DTYPES, quant, QUANTS, group_size)
    if quant is not None and dtype == "bfloat16":
        raise UserError("weight-only int4/int8 engines are built over a float16 graph; drop --dtype bfloat16")
    require_onnx()
    trt = require_tensorrt(fl)  # fail before any work when it cannot finish
    if fl.local_gpu:
        if compute_capabilities:
            raise UserError("--compute-capability is for --target tensorrt-rtx; --target tensorrt builds for this GPU")
        gpu, cc = current_gpu()
        targets, target_info = [gpu, cc], {"gpu": gpu, "compute_capability": cc}
    else:
        targets = rtx_targets(compute_capabilities, dtype, quant)
        target_info = {"compute_capabilities": targets}
    src = Path(src)
    check_source(src)
    cfg = NLDConfig.from_file(src / "config.json")
    profs = profiles(cfg.block_size, cfg.max_position_embeddings, max_prefill)
    precision = quant or dtype
    key = cache_key(flavour=fl.name, source_sha256=source_checksum(src), precision=precision, targets=targets,
                    version=trt.__version__, profs=profs)
    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    model = load_model(src, dtype=torch_dtype)
    has_lora = model.encoder.layers[0].self_attn.o_lora is not None
    with atomic_dir(out, force=force) as tmp:
        log(f"[1/3] tracing the step graph ({dtype}{', weight-only ' + quant if quant else ''})")
        export_graph(model, tmp / GRAPH_FILE, torch_dtype)
        if quant:
            quantize_qdq(tmp / GRAPH_FILE, QUANTS[quant], group_size)
        graph = make_tensorrt_compatible(onnx.load(str(tmp / GRAPH_FILE)))
        bad = unsupported_ops(graph)
        if bad:
            raise UserError(f"the graph uses operators TensorRT's parser does not support: {', '.join(bad)}")
        onnx.save(graph, str(tmp / GRAPH_FILE))
        log(f"[2/3] {fl.title} build")
        plan = tmp / f"{ENGINE_PREFIX}{key[:16]}.plan"
        seconds = build_engine(fl, tmp / GRAPH_FILE, plan, dtype=dtype, quant=quant, targets=targets, profs=profs,
                               cfg=cfg, timing_cache=user_cache(fl, "timing.cache"), log=log)
        log("[3/3] config, tokenizer, manifest")
        (tmp / "config.json").write_text((src / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
        copy_side_files(src, tmp)
        shutil.rmtree(tmp / LORA_DIR, ignore_errors=True)  # baked into the graph (use_lora input)
        manifest = write_manifest(
            tmp, src, kind=fl.name, targets=[fl.name, "onnx"], precision=precision, dtype=dtype,
            quantization={"scheme": quant, "group_size": group_size, "symmetric": True, "format": "qdq"}
            if quant else None,
            graph={"file": GRAPH_FILE, "inputs": graph_inputs(tmp / GRAPH_FILE),
                   "outputs": ["logits", "new_keys", "new_values"], "lora": has_lora},
            **{fl.name: {"engine": plan.name, "engine_sha256": file_sha256(plan),
                         "engine_bytes": plan.stat().st_size, "cache_key": key, "version": trt.__version__,
                         **target_info, "profiles": profs, "build_seconds": round(seconds, 3)}},
            tool_versions=tool_versions("onnx", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13"),
            export_seconds=round(time.perf_counter() - t0, 3))
    log(f"wrote {out}: {fl.title} engine {manifest[fl.name]['engine_bytes'] / 2**20:.1f} MiB for "
        f"{', '.join(str(t) for t in targets)} in {manifest['export_seconds']:.1f} s")
    return manifest


def quantize_qdq(path: Path, bits: int, group_size: int) -> None:
    """Weight-only QDQ: each constant-weight MatMul reads `DequantizeLinear(q, scale)` (zero point 0).

    int4: block-wise along the input dimension (onnxruntime's quantizer, QDQ format, opset 21).
    int8: per output channel, written here (onnxruntime's quantizer has no 8-bit QDQ).
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node
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
