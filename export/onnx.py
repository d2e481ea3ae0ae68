"""`edge-dlm export --target onnx`: one step graph that serves every decoding mode.

The graph is one model pass (`nld.md`) over T new tokens with the KV cache as plain inputs/outputs:

    inputs   input_ids [1, T] int64, position_ids [1, T] int64,
             attn_mask [T, L + T] bool (True = may attend; the pattern is data, so one graph runs
             causal, block and QuadraticSpec passes), past_keys / past_values [layers, nkv, L, hd],
             use_lora [] float (1 = add the LinearSpec LoRA drafter; present only when shipped)
    outputs  logits [1, T, V], new_keys / new_values [layers, nkv, T, hd]

The engine keeps the cache (commit / rollback are the runtime's, not the graph's). The graph is
traced from `NLDModel` itself with torch.onnx's dynamo exporter, T and L dynamic (both may be 0/1
at run time). `--quant int4|int8` then rewrites every MatMul with a constant weight into
onnxruntime's weight-only `MatMulNBits` (block-wise, `--group-size`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from edge_dlm.primitives.attention import BLOCK
from edge_dlm.primitives.errors import UserError, install_hint

GRAPH_FILE = "model.onnx"
INPUTS = ["input_ids", "position_ids", "attn_mask", "past_keys", "past_values", "use_lora"]
OUTPUTS = ["logits", "new_keys", "new_values"]
ONNX_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # ORT CPU has no bf16 kernels
ONNX_QUANTS = {"int4": 4, "int8": 8}


class GraphCache:
    """Stands in for `KVCache` while tracing: past K/V are inputs, this pass's K/V are outputs."""

    length = None  # unused: the mask is explicit

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor) -> None:
        self.past_k, self.past_v = past_keys, past_values
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_k.append(k)
        self.new_v.append(v)
        return torch.cat([self.past_k[layer], k], dim=1), torch.cat([self.past_v[layer], v], dim=1)


class StepGraph(nn.Module):
    """`NLDModel` as the exported step function (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attn_mask, past_keys, past_values, use_lora):
        cache = GraphCache(past_keys, past_values)
        logits = self.model(input_ids, position_ids, cache=cache, attn=BLOCK, mask=attn_mask[None, None],
                            use_lora=use_lora)
        return logits, torch.stack(cache.new_k), torch.stack(cache.new_v)


def example_inputs(cfg, dtype: torch.dtype, cached: int = 5, t: int = 3) -> tuple[torch.Tensor, ...]:
    kv = (cfg.num_hidden_layers, cfg.num_key_value_heads, cached, cfg.head_dim)
    return (torch.zeros(1, t, dtype=torch.long), torch.arange(cached, cached + t)[None],
            torch.ones(t, cached + t, dtype=torch.bool), torch.zeros(kv, dtype=dtype),
            torch.zeros(kv, dtype=dtype), torch.tensor(0.0, dtype=dtype))


def export_graph(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Trace `model` into the ONNX step graph at `path` (weights inline below 2 GB, else beside it)."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {1: dyn}, "position_ids": {1: dyn}, "attn_mask": {0: dyn, 1: dyn},
              "past_keys": {2: dyn}, "past_values": {2: dyn}, "use_lora": None}
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30
    from edge_dlm.model.compiled import exclusive

    with warnings.catch_warnings(), exclusive():  # never beside a background compile's trace
        warnings.simplefilter("ignore")
        program = torch.onnx.export(StepGraph(model), example_inputs(model.config, dtype), dynamo=True,
                                    input_names=INPUTS, output_names=OUTPUTS, dynamic_shapes=shapes,
                                    external_data=big, verbose=False)
    program.save(str(path), external_data=big)


def fuse_graph(path: Path, cfg) -> int:
    """onnxruntime's transformer fusions on the step graph at `path` (what optimum's `ORTOptimizer`
    runs; it takes only the transformers model types it knows, so edge-dlm calls onnxruntime's
    optimizer itself): each RMSNorm's seven operators -> one `SimplifiedLayerNormalization` kernel
    (the demo model 1.04-1.10x the tokens/s on a CPU core, the same tokens in every mode:
    `scripts/bench_onnx_fusion.py`, BENCHMARKS.md).
    Only the graph's structure is read and rewritten (weights kept beside it stay where they are), at
    level 0 (no hardware-specific rewrites: the session applies its own at load). Returns the fused count."""
    import contextlib
    import io
    import logging

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    graph = onnx.load(str(path), load_external_data=False)
    logging.disable(logging.WARNING)  # its notes on shape inference and skipped fusions are not ours to print
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fused = optimize_model(graph, model_type="gpt2", num_heads=cfg.num_attention_heads,
                                   hidden_size=cfg.hidden_size, opt_level=0)
    finally:
        logging.disable(logging.NOTSET)
    n = sum(fused.get_fused_operator_statistics().values())
    tmp = path.with_name(path.name + ".fused")
    onnx.save(fused.model, str(tmp))
    os.replace(tmp, path)
    return n


def quantize_graph(path: Path, bits: int, group_size: int, symmetric: bool) -> None:
    """Weight-only int4/int8: every constant-weight MatMul -> `MatMulNBits` (onnxruntime)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=bits, block_size=group_size, is_symmetric=symmetric)
    q.process()
    q.model.save_model_to_file(str(path), use_external_data_format=False)


def graph_inputs(path: Path) -> list[str]:
    """The input names the saved graph really has (the exporter may keep or drop an unused one)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def check_export_args(target: str, dtype: str, dtypes, quant: str | None, quants, group_size: int) -> None:
    """One-line errors for a --dtype / --quant / --group-size the target does not take."""
    from edge_dlm.model.quant import GROUP_SIZES

    if dtype not in dtypes:
        raise UserError(f"--dtype {dtype} not supported for {target}; known: {', '.join(dtypes)}")
    if quant is not None and quant not in quants:
        raise UserError(f"--quant {quant} not supported for {target}; known: {', '.join(quants)} (weight-only)")
    if quant is not None and group_size not in GROUP_SIZES:
        raise UserError(f"group size {group_size} not supported; known: {', '.join(map(str, GROUP_SIZES))}")


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if _missing(m)]
    if missing:
        raise UserError(f"--target onnx needs {', '.join(missing)}, not installed: {install_hint('onnx')}")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def export_onnx(src: str | Path, out: str | Path, *, dtype: str = "float32", quant: str | None = None,
                group_size: int = 64, symmetric: bool = True, force: bool = False, log=print) -> dict:
    """Export checkpoint `src` to an ONNX artifact directory `out`; returns the manifest."""
    from edge_dlm.export.manifest import tool_versions, write_manifest
    from edge_dlm.export.quantize import check_source, copy_side_files
    from edge_dlm.primitives.fsutil import atomic_dir
    from edge_dlm.model.weights import load_model

    require_onnx()
    check_export_args("ONNX", dtype, ONNX_DTYPES, quant, ONNX_QUANTS, group_size)
    src = Path(src)
    check_source(src)  # a quantized torch artifact is refused: ONNX quantizes with --quant itself
    t0 = time.perf_counter()
    model = load_model(src, dtype=ONNX_DTYPES[dtype], lora=True)
    has_lora = model.encoder.layers[0].self_attn.o_lora is not None
    with atomic_dir(out, force=force) as tmp:
        n = 3 if quant is not None else 2  # the steps this export runs, so the count never skips one
        log(f"[1/{n}] tracing the step graph of {src} ({dtype})")
        export_graph(model, tmp / GRAPH_FILE, ONNX_DTYPES[dtype])
        fuse_graph(tmp / GRAPH_FILE, model.config)
        if quant is not None:
            log(f"[2/{n}] weight-only {quant} (MatMulNBits, block {group_size})")
            quantize_graph(tmp / GRAPH_FILE, ONNX_QUANTS[quant], group_size, symmetric)
        log(f"[{n}/{n}] config, tokenizer, manifest")
        shutil.copy2(src / "config.json", tmp / "config.json")
        copy_side_files(src, tmp)
        lora_dir = tmp / "linear_spec_lora"
        if lora_dir.exists():
            shutil.rmtree(lora_dir)  # baked into the graph (use_lora input)
        manifest = write_manifest(
            tmp, src, kind="onnx", targets=["onnx"], precision=quant or dtype, dtype=dtype,
            quantization={"scheme": quant, "group_size": group_size, "symmetric": symmetric} if quant else None,
            graph={"file": GRAPH_FILE, "inputs": graph_inputs(tmp / GRAPH_FILE), "outputs": OUTPUTS,
                   "lora": has_lora},
            config=model.config.to_dict(),
            tool_versions=tool_versions("onnx", "onnxruntime", "onnxscript"),
            export_seconds=round(time.perf_counter() - t0, 3))
    size = (Path(out) / GRAPH_FILE).stat().st_size
    log(f"wrote {out}: {GRAPH_FILE} {size / 2**20:.2f} MiB in {manifest['export_seconds']:.1f} s")
    return manifest
