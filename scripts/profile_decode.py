"""Where a decode step's time goes: one-token causal passes (the AR step, as `bench_llamacpp.py` times
them) on a random-weight model at a real shape, after a context, under torch's profiler, split into the
matmul kernels, the attention kernel and everything else (the other operators, and the host's Python
between them: the wall time the operators do not account for).

    .venv/bin/python scripts/profile_decode.py --shape 3b --layers 8 --threads 1 --context 506
    .venv/bin/python scripts/profile_decode.py --model edge_dlm/demo_model --dtype float32 --small-ops-ab 8

The weights are random at the shape's layer sizes and vocabulary (`bench_llamacpp.random_checkpoint`,
nothing downloaded), loaded as the runtime's loader loads them (`--dtype`, `--quant`: the same kernels,
eager). Prints the step's wall time, its parts and the top operators by their own time. On a busy
machine the wall time grows with the waits for a core; the operators' shares hold better.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KERNELS = {"matmul": ("edge_dlm::bf16_gemm", "edge_dlm::x16_gemm", "aten::mm", "aten::addmm", "aten::linear"),
           # with the rotary embedding and the cache writes in the call (`rope_attend`, eager passes)
           "attention": ("edge_dlm::attend", "edge_dlm::rope_attend", "aten::_scaled_dot_product_flash_attention_for_cpu")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a checkpoint to load instead of random weights at --shape / --layers")
    p.add_argument("--shape", choices=("3b", "8b"), default="3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=506)
    p.add_argument("--steps", type=int, default=8, help="steps timed, then as many profiled")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", choices=("int8", "int4"))
    p.add_argument("--small-ops-ab", type=int, metavar="ROUNDS",
                   help="instead: the step with the small operations' C calls (`enable_small_ops`) on and off, "
                        "interleaved for ROUNDS rounds of --steps steps each, medians")
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_llamacpp import random_checkpoint
    from edge_dlm.primitives.attention import CAUSAL
    from edge_dlm.runtime import load

    with tempfile.TemporaryDirectory(prefix="edge-dlm-profile-") as work:
        src = a.model or random_checkpoint(a.shape, a.layers, Path(work) / "ckpt")
        rt = load(src, device="cpu", dtype=a.dtype, quant=a.quant, group_size=32, compile="off", lora=False,
                  threads=a.threads)
    m, ctx = rt.model, a.context
    cache = m.new_cache(ctx + 16)
    ids = torch.randint(0, 500, (1, ctx + 1))
    with torch.inference_mode():
        m(ids[:, :ctx], torch.arange(ctx)[None], cache=cache, attn=CAUSAL, last_only=True)
        cache.commit(ctx)
        one, pos = ids[:, ctx:ctx + 1], torch.tensor([[ctx]])

        def step():
            m(one, pos, cache=cache, attn=CAUSAL)
            cache.commit(0)  # the same position every step: the context stays `ctx`

        step()
        if a.small_ops_ab:
            return small_ops_ab(m, step, a)
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        wall = (time.perf_counter() - t) / a.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
    events = prof.key_averages()
    own = {e.key: e.self_cpu_time_total / 1e3 / a.steps for e in events}  # ms a step
    parts = {k: sum(own.get(n, 0.0) for n in names) for k, names in KERNELS.items()}
    parts["other operators"] = sum(own.values()) - sum(parts.values())
    profiled = sum(own.values())
    cfg = m.config
    print(f"{a.model or 'NLD-' + a.shape + ' shape'}, {cfg.num_hidden_layers} layers, {a.dtype}{' ' + a.quant if a.quant else ''}, {a.threads} thread(s), "
          f"{ctx} tokens of context: {wall * 1e3:.1f} ms a step ({a.steps} steps; under the profiler "
          f"{profiled:.1f} ms of operators)")
    for k, v in parts.items():
        print(f"  {k}: {v:.1f} ms ({v / profiled:.1%} of the operators' time)")
    print(f"  the host between operators (the unprofiled wall time less the operators' profiled time, a lower "
          f"bound): {max(0.0, wall * 1e3 - profiled):.1f} ms")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


def small_ops_ab(m, step, a) -> int:
    """A decode step's time with the small operations as one C call each and with torch's operations, in one
    process, interleaved (each round times both), so a busy neighbour or the memory's varying rate slows
    both alike; the hooks the CPU backend set are taken off and put back."""
    import statistics

    hooks = [(mod, n, getattr(mod, n)) for mod in m.modules() for n in ("kernel", "act", "rope_attention")
             if getattr(mod, n, None) is not None]
    if not hooks:
        sys.exit("the small operations' kernels are off here (no C++ operators, or a float16 model)")
    times = {"C calls": [], "torch's operations": []}
    for _ in range(a.small_ops_ab):
        for name in times:
            for mod, n, f in hooks:
                setattr(mod, n, f if name == "C calls" else None)
            step()
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            times[name].append((time.perf_counter() - t) / a.steps * 1e3)
    for mod, n, f in hooks:
        setattr(mod, n, f)
    for name, ms in times.items():
        print(f"{name}: {statistics.median(ms):.2f} ms a step (median of {len(ms)} rounds of {a.steps}; best "
              f"{min(ms):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
