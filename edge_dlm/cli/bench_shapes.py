"""`edge-dlm bench --shape 3b|8b`: one forward at T = 1, B and B(B+1) tokens over a cache, with random
weights at the real NLD shapes, against the memory-bandwidth floor.

The floor is the time to read every weight once: weight bytes / the bytes per second a large device
copy moves (its reads and writes both counted, so no factor 2). A decode step at T = 1 is memory
bound, so its ratio to the floor says how close the engine gets to the hardware; wider passes (the
diffusion block, QuadraticSpec's B(B+1)) should cost little more than T = 1 until compute takes over.
Each pass is timed eagerly and, on CUDA, replayed as a CUDA graph captured at the same cache length
(what the launch overhead costs); with `--compile on` also as the compiled step function the runtime
runs (`edge_dlm.model.compiled`: inductor on the CPU, CUDA graphs on a GPU), next to eager. `--quant int4|int8|nf4` times the same passes again after quantizing
the weights, next to their own (smaller) read floor and as a ratio to the float pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from edge_dlm.model.config import NLDConfig, RopeConfig

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
    from edge_dlm.model.nld import NLDModel, rope_inv_freq

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
    """Bytes/s a device copy moves, reads and writes both counted (2 x bytes / time)."""
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


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        s = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def graph_replay(fn, device: torch.device, repeats: int) -> float | None:
    """Median seconds of replaying `fn` captured once as a CUDA graph (None off CUDA)."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy inits, kernel compiles)
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, device, repeats)


def time_forwards(model, tokens: list[int], context: int, device: torch.device,
                  repeats: int) -> dict[int, tuple[float, float | None]]:
    """Per T: (eager, graph replay) median seconds of one forward of T new tokens over a
    `context`-token cache (T = B(B+1): QuadraticSpec's cycle mask, else the block mask)."""
    from edge_dlm.primitives.attention import BLOCK, CAUSAL, Attn

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

            def step():
                model(x, pos, cache=cache, attn=attn)

            out[t] = (timed(step, device, repeats), graph_replay(step, device, repeats))
            cache.commit(0)
    return out


def run_shapes(a: argparse.Namespace, cfg: NLDConfig | None = None, context: int = 512) -> int:
    from edge_dlm import kernels
    from edge_dlm.kernels.backend import choose
    from edge_dlm.model.quant import QuantSpec, weight_bytes
    from edge_dlm.model.quantize import quantize_model
    from edge_dlm.primitives.device import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    cfg = cfg or shape_config(a.shape, a.layers)  # auto: the dtype a bf16 checkpoint of this size loads in
    dtype = resolve_dtype(None if a.dtype == "auto" else a.dtype, device, bf16_bytes=cfg.parameter_count() * 2)
    spec = QuantSpec(a.quant, group_size=a.group_size) if a.quant else None
    model = random_model(cfg, dtype, device)
    # as a loaded model: Triton attention / int matmuls on CUDA, the C kernels on a CPU
    backend = choose(device, kernels.choice(a.kernels))
    backend.apply(model)
    from edge_dlm.model import compiled
    from edge_dlm.model.store import compiled_cache

    use_compile = compiled.resolve(getattr(a, "compile", "off"), device)
    bw = copy_bandwidth(device)
    b = cfg.block_size
    dname = str(dtype).removeprefix("torch.")
    rows, gb = [], {}
    for weights in [dname] + ([f"{spec.scheme} g{spec.group_size}"] if spec else []):
        if weights != dname:
            quantize_model(model, spec)
            backend.apply(model)  # the quantized layers too
            sync(device)
        nbytes = weight_bytes(model)
        gb[weights] = nbytes / 1e9
        floor = nbytes / bw  # reading every weight once at the copy's (read + write) byte rate
        widths = [1, b, b * (b + 1)]
        timings = time_forwards(model, widths, context, device, max(1, a.repeats))
        fast = {}
        if use_compile and weights == dname:  # the float passes (quantized weights run eagerly)
            compiled.enable(model, compiled_cache())
            fast = {t: e for t, (e, _) in time_forwards(model, widths, context, device, max(1, a.repeats)).items()}
            compiled.disable(model)
        for t, (eager, graph) in timings.items():
            best = min(x for x in (eager, graph, fast.get(t)) if x is not None)
            rows.append({"weights": weights, "tokens": t, "ms": eager * 1000,
                         "graph_ms": graph * 1000 if graph is not None else None,
                         "compiled_ms": fast[t] * 1000 if t in fast else None, "floor_ms": floor * 1000,
                         "vs_floor": best / floor, "tokens_per_s": t / best})
    base = {r["tokens"]: r for r in rows if r["weights"] == dname}
    for r in rows:
        key = "graph_ms" if r["graph_ms"] is not None else "ms"
        r["vs_float"] = r[key] / base[r["tokens"]][key]
    meta = {"shape": a.shape, "layers": cfg.num_hidden_layers, "device": str(device), "dtype": dname,
            "weight_gb": gb, "copy_bandwidth_gbs": bw / 1e9, "context": context}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    sizes = ", ".join(f"{k} {v:.2f} GB" for k, v in gb.items())
    print(f"NLD-{a.shape} shape ({cfg.num_hidden_layers} layers, random weights) on {device}: {sizes}; "
          f"copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s (read + write), cache {context} tokens\n")
    print("| weights | tokens | eager ms | graph ms | compiled ms | compiled / eager | read floor ms | x floor "
          "| vs float | tokens/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        graph = f"{r['graph_ms']:.2f}" if r["graph_ms"] is not None else "n/a (CPU)"
        fast = f"{r['compiled_ms']:.2f}" if r["compiled_ms"] is not None else "off"
        ratio = f"{r['compiled_ms'] / r['ms']:.2f}" if r["compiled_ms"] is not None else ""
        print(f"| {r['weights']} | {r['tokens']} | {r['ms']:.2f} | {graph} | {fast} | {ratio} | {r['floor_ms']:.2f} | "
              f"{r['vs_floor']:.2f} | {r['vs_float']:.2f} | {r['tokens_per_s']:.0f} |")
    return 0
