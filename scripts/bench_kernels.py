"""Block attention: the Triton kernel vs torch SDPA (materialized mask) vs FlexAttention (block mask).

For each pattern and query count T at real NLD shapes (32 query / 8 KV heads, head_dim 128) over
caches of L tokens: parity (max abs error vs an fp32 reference) and median time per call, next to the
memory-bandwidth floor (bytes of K + V + Q + O over the device's measured copy bandwidth).
Needs a CUDA GPU for meaningful numbers; `--smoke` runs tiny shapes (CPU: TRITON_INTERPRET=1).

    .venv/bin/python scripts/bench_kernels.py [--dtype bfloat16] [--caches 1024 4096 16384] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from edge_dlm.primitives.attention import Attn  # noqa: E402
from edge_dlm.kernels.attention import block_attention, block_attention_ref  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds per call (CUDA events on GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (256 MiB on CPU)."""
    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, 5)
    return 2 * a.numel() * 4 / t  # read + write


def flex_fn(q, k, v, attn: Attn, cached: int):
    """FlexAttention with a block mask built from the same pattern (None if unavailable)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    t, n_keys = q.shape[1], k.shape[1]
    new = attn.new_mask(t, q.device)

    def mask_mod(b, h, qi, kj):
        jj = kj - cached
        return (kj < cached) | new[qi, jj.clamp(min=0)]

    bm = create_block_mask(mask_mod, None, None, t, n_keys, device=q.device)
    fa = torch.compile(flex_attention) if q.device.type == "cuda" else flex_attention
    return lambda: fa(q[None], k[None], v[None], block_mask=bm, enable_gqa=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--caches", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (for CPU / the interpreter)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    nq, nkv, d, b = (32, 8, 128, a.block) if not a.smoke else (4, 2, 16, 4)
    caches = a.caches if not a.smoke else [24]
    bw = copy_bandwidth(device)
    cases = [("causal T=1 (AR step)", Attn("causal"), 1), (f"causal T={b} (verify)", Attn("causal"), b),
             (f"block T={b} (draft/denoise)", Attn("block"), b),
             (f"quad_cycle T={b * (b + 1)}", Attn("quad_cycle", block=b), b * (b + 1))]
    rows = []
    for cached in caches:
        for name, attn, t in cases:
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(nq, t, d, generator=g).to(device, dtype)
            k = torch.randn(nkv, cached + t, d, generator=g).to(device, dtype)
            v = torch.randn(nkv, cached + t, d, generator=g).to(device, dtype)
            ref = block_attention_ref(q.float(), k.float(), v.float(), attn, cached=cached)
            err = (block_attention(q, k, v, attn, cached=cached).float() - ref).abs().max().item()
            floor = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size() / bw
            row = {"L": cached, "case": name, "max_abs_err": err, "floor_us": floor * 1e6,
                   "triton_us": timed(lambda: block_attention(q, k, v, attn, cached=cached), device, a.repeats) * 1e6,
                   "sdpa_us": timed(lambda: block_attention_ref(q, k, v, attn, cached=cached), device, a.repeats) * 1e6}
            flex = flex_fn(q, k, v, attn, cached)
            row["flex_us"] = timed(flex, device, a.repeats) * 1e6 if flex else None
            rows.append(row)
            print(f"L={cached} {name}: done", file=sys.stderr)
    meta = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
            "dtype": a.dtype, "heads": f"{nq}q/{nkv}kv x {d}", "copy_GBps": bw / 1e9, "torch": torch.__version__}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(f"{meta['device']}, {a.dtype}, {meta['heads']}, copy bandwidth {meta['copy_GBps']:.0f} GB/s, "
          f"torch {meta['torch']}\n")
    print("| L | pass | max abs err | floor us | Triton us (x floor) | SDPA+mask us | Flex us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flex = f"{r['flex_us']:.1f}" if r["flex_us"] is not None else "n/a"
        print(f"| {r['L']} | {r['case']} | {r['max_abs_err']:.1e} | {r['floor_us']:.1f} | "
              f"{r['triton_us']:.1f} ({r['triton_us'] / r['floor_us']:.1f}x) | {r['sdpa_us']:.1f} | {flex} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
