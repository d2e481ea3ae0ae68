"""Peak memory of `edge-dlm export` on a checkpoint at a real NLD shape and depth.

    .venv/bin/python scripts/bench_export_memory.py --shape 3b --out bench_results/export_memory.json
    .venv/bin/python scripts/bench_export_memory.py --shape 3b --target quantized compressed-tensors \
        --formats int8 int4 --out bench_results/export_memory_quantized.json
    .venv/bin/python scripts/bench_export_memory.py --shape 3b --target onnx --formats float16 \
        --out bench_results/export_memory_onnx.json

Writes a random bfloat16 checkpoint at the shape (full depth unless --layers), one shard per layer so
that writing it takes one layer's memory, then runs each export (GGUF as BF16, Q8_0 and Q4_0; the
quantized torch artifact and compressed-tensors as int8 and int4), each in its own process, and records
each export's peak resident memory (the kernel's `ru_maxrss` of the child), wall time and output size,
beside the checkpoint's size and its largest tensor. The exports read and write one tensor (GGUF: a
slice of rows) at a time, so their peak follows the largest tensor, not the model. ONNX traces the
whole step graph, so it holds the model once, in the export's precision.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def write_sharded(cfg, out: Path) -> int:
    """A random bf16 checkpoint, one safetensors shard per layer (plus one for the rest); returns bytes."""
    from safetensors.torch import save_file

    from edge_dlm.model.testing import SAMPLE_TEXT, build_tokenizer
    from edge_dlm.model.weights import expected_shapes

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(SAMPLE_TEXT * 4, 512, out)
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}, indent=2))
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, shape in expected_shapes(cfg).items():
        key = name.split(".")[2] if name.startswith("encoder.layers.") else "rest"
        groups.setdefault(key, []).append((name, shape))
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, (key, items) in enumerate(groups.items()):
        shard = f"model-{i:05d}.safetensors"
        tensors = {}
        for name, shape in items:
            t = torch.empty(shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=g)
            tensors[name] = t
            weight_map[name] = shard
            total += t.numel() * 2
        save_file(tensors, str(out / shard))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def main() -> int:
    from edge_dlm.cli.bench_shapes import shape_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("3b", "8b"), default="3b")
    p.add_argument("--layers", type=int, default=None, help="default: the shape's full depth")
    p.add_argument("--target", nargs="+", choices=("gguf", "quantized", "compressed-tensors", "onnx", "load"),
                   default=["gguf"], help="load: quantize on load (generate --quant) instead of an export; "
                   "onnx: the step graph in each of --formats float16 / float32")
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one; needs ~3x the model)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "export_memory.json"))
    a = p.parse_args()
    cfg = shape_config(a.shape, a.layers)
    work = Path(a.work or tempfile.mkdtemp(prefix="edge-dlm-export-mem-"))
    try:
        t0 = time.perf_counter()
        total = write_sharded(cfg, work / "ckpt")
        from edge_dlm.model.weights import expected_shapes

        largest = max(math.prod(s) for s in expected_shapes(cfg).values()) * 2  # bf16
        print(f"checkpoint: {cfg.num_hidden_layers} layers, {total / 2**30:.2f} GiB bf16 "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows = []
        for target in a.target:
            for fmt in a.formats:
                if (target != "gguf" and fmt == "bf16") or ((target == "onnx") != (fmt in ("float16", "float32"))):
                    continue
                args = ["--quant", fmt] if fmt in ("int8", "int4") else ["--dtype", "bfloat16" if fmt == "bf16" else fmt]
                if target == "load":  # quantize on load, then answer one token (no export)
                    out = work / "none"
                    cmd = ["generate", "--model", str(work / "ckpt"), *args, "--prompt", "hi", "--mode", "ar",
                           "--max-new-tokens", "1", "--device", "cpu", "--compile", "off"]
                elif target in ("gguf", "onnx"):
                    out, args = work / f"{fmt}.{target}", [*args, "--target", target]
                else:
                    out = work / f"{target}-{fmt}"
                    args = [*args, "--format", "edge-dlm" if target == "quantized" else target]
                if target != "load":
                    cmd = ["export", str(work / "ckpt"), "-o", str(out), *args, "--force"]
                t0 = time.perf_counter()
                # each export under its own wrapper process: RUSAGE_CHILDREN's peak is then this one's alone
                run = subprocess.run([sys.executable, "-c", WRAP, str(ROOT / ".venv" / "bin" / "edge-dlm"), *cmd],
                                     capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if run.returncode != 0:
                    print(run.stderr[-2000:], file=sys.stderr)
                    return 1
                peak = int(run.stdout.strip().splitlines()[-1])  # KiB
                size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                row = {"target": target, "format": fmt, "peak_rss_gib": round(peak / 2**20, 2),
                       "wall_s": round(wall, 1), "output_gib": round(size / 2**30, 2)}
                rows.append(row)
                print(row, flush=True)
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
        from benchlib import record

        record(a.out, {"shape": a.shape, "layers": cfg.num_hidden_layers, "checkpoint_gib": round(total / 2**30, 2),
                  "largest_tensor_gib": round(largest / 2**30, 2),
                       "exports": rows})
        print(f"wrote {a.out}")
        return 0
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
