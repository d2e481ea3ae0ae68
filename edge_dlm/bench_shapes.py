"""`edge-dlm bench --shape 3b|8b`: one forward at T = 1, B and B(B+1) tokens over a cache, with random
weights at the real NLD shapes, against the memory-bandwidth floor.

The floor is the time to read every weight once: weight bytes / the device's measured copy bandwidth
(a large device-to-device copy, read + write counted). A decode step at T = 1 is memory bound, so its
ratio to the floor says how close the engine gets to the hardware; wider passes (the diffusion block,
QuadraticSpec's B(B+1)) should cost little more than T = 1 until compute takes over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from edge_dlm.config import NLDConfig, RopeConfig

SHAPES = {  # nld.md, "The family"
    "3b": dict(num_hidden_layers=26, hidden_size=3072, intermediate_size=9216),
    "8b": dict(num_hidden_layers=34, hidden_size=4096, intermediate_size=14336),
}


def shape_config(shape: str, layers: int | None = None) -> NLDConfig:
    s = dict(SHAPES[shape])
    if layers:
        s["num_hidden_layers"] = layers
    rope = RopeConfig(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
    return NLDConfig(vocab_size=131072, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=262144, mask_token_id=100, eos_token_id=11, bos_token_id=1,
                     block_size=32, rope=rope, **s)


def random_model(cfg: NLDConfig, dtype: torch.dtype, device: torch.device):
    from edge_dlm.model import NLDModel, rope_inv_freq

    with torch.device("meta"):
        model = NLDModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def time_forwards(model, tokens: list[int], context: int, device: torch.device, repeats: int) -> dict[int, float]:
    """Median seconds of one causal/block forward of T new tokens over a `context`-token cache."""
    from edge_dlm.attention import BLOCK, CAUSAL, Attn

    b = model.config.block_size
    cache = model.new_cache(context + max(tokens))
    with torch.inference_mode():
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, context), device=device)
        model(ids, torch.arange(context, device=device)[None], cache=cache, attn=CAUSAL)
        cache.commit(context)
        out = {}
        for t in tokens:
            attn = Attn("quad_cycle", block=b) if t == b * (b + 1) else BLOCK
            x = torch.randint(0, vocab, (1, t), device=device)
            pos = torch.arange(context, context + t, device=device)[None]
            model(x, pos, cache=cache, attn=attn)  # warm-up
            times = []
            for _ in range(repeats):
                sync(device)
                s = time.perf_counter()
                model(x, pos, cache=cache, attn=attn)
                sync(device)
                times.append(time.perf_counter() - s)
            cache.commit(0)
            out[t] = statistics.median(times)
    return out


def run_shapes(a: argparse.Namespace, cfg: NLDConfig | None = None, context: int = 512) -> int:
    from edge_dlm.runtime import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    dtype = resolve_dtype(None if a.dtype == "auto" else a.dtype, device)
    cfg = cfg or shape_config(a.shape)
    model = random_model(cfg, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device)
    floor = weight_bytes / (bw / 2)  # reading the weights once: half of a copy's traffic
    b = cfg.block_size
    times = time_forwards(model, [1, b, b * (b + 1)], context, device, max(1, a.repeats))
    rows = [{"tokens": t, "ms": s * 1000, "floor_ms": floor * 1000, "vs_floor": s / floor,
             "tokens_per_s": t / s} for t, s in times.items()]
    meta = {"shape": a.shape, "layers": cfg.num_hidden_layers, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "weight_gb": weight_bytes / 1e9,
            "copy_bandwidth_gbs": bw / 1e9, "context": context}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(f"NLD-{a.shape} shape ({cfg.num_hidden_layers} layers, random weights) on {device} {meta['dtype']}: "
              f"{meta['weight_gb']:.2f} GB of weights, copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s, "
              f"cache {context} tokens\n")
        print("| tokens | ms / forward | floor ms | x floor | tokens/s |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['tokens']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {r['vs_floor']:.2f} | {r['tokens_per_s']:.0f} |")
    return 0
