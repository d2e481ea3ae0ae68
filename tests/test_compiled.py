"""Compiled step functions (`--compile on`): the same tokens, NFE and cache as eager, with no graph
break and no recompilation once warm (what a CUDA graph capture needs, proven on the CPU)."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from edge_dlm.decoding import Decoder, GenerationOptions, mode_fn
from edge_dlm.model import compiled
from edge_dlm.model.nld import segments
from edge_dlm.primitives.attention import Attn
from edge_dlm.primitives.cache import capacity_bucket, window_bucket
from edge_dlm.primitives.sampling import SamplingParams

pytestmark = pytest.mark.skipif(bool(compiled.available("cpu")), reason="no C++ compiler for inductor")

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    """(eager, compiled): the same weights, LoRA drafter included."""
    fast = copy.deepcopy(tiny_model)
    compiled.enable(fast, tmp_path_factory.mktemp("compiled"))
    return tiny_model, fast


def lockstep(eager, fast, mode: str, *, eos: int | None = None, **kw):
    """Run one request on both models event by event; every event and the committed cache (what a
    rollback leaves) must agree after each one. Returns the eager decoder."""
    sampling = SamplingParams(**{k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in kw})
    decs = []
    for model in (eager, fast):
        opts = GenerationOptions(mode=mode, sampling=sampling, **kw).resolve(model.config.block_size)
        dec = Decoder(model, opts, model.new_cache(len(PROMPT) + opts.max_new_tokens + opts.scratch_tokens()))
        if eos is not None:
            dec.eos_id = eos
        decs.append(dec)
    streams = [mode_fn(mode)(d, PROMPT) for d in decs]
    for a, b in zip(*streams, strict=True):
        assert a == b, (mode, kw)
        ca, cb = decs[0].cache, decs[1].cache
        assert ca.length == cb.length
        for x, y in zip(ca.committed(), cb.committed()):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert decs[0].output_ids == decs[1].output_ids and decs[0].nfe == decs[1].nfe
    return decs[0]


@pytest.mark.parametrize("block", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_every_mode_every_block_size(pair, block):
    for mode in MODES:
        for lora in ((True, False) if mode == "linear-spec" else (True,)):
            lockstep(*pair, mode, block_size=block, max_new_tokens=20, use_lora=lora)


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_budgets(pair, budget):
    for mode in MODES:
        d = lockstep(*pair, mode, block_size=4, max_new_tokens=budget)
        assert len(d.output_ids) <= budget


def test_seeded_sampling(pair):
    """Sampled picks made inside the compiled passes (temperature, top-k, top-p with top-k) and drawn
    from the logits after them (top-p alone) agree with eager."""
    from torch._dynamo.utils import counters

    configs = (dict(temperature=0.8), dict(temperature=1.0, top_k=10, top_p=0.9), dict(temperature=0.9, top_p=0.8))
    for sampling in configs:
        for mode in MODES:
            lockstep(*pair, mode, block_size=4, max_new_tokens=16, seed=5, **sampling)
    assert not counters["graph_break"], dict(counters["graph_break"])
    keys, built = pair[1].step.keys, dict(pair[1].step.fns)
    for sampling in configs:  # another seed: the same graphs (the seed is a tensor the pass reads)
        for mode in MODES:
            lockstep(*pair, mode, block_size=4, max_new_tokens=16, seed=6, **sampling)
    # this model's graphs (dynamo's global counters also count other models' background compiles)
    assert pair[1].step.keys == keys and all(pair[1].step.fns[k] is f for k, f in built.items())


def test_eos_in_every_position(pair):
    """EOS taken to be the k-th token AR emits, for k over two blocks: every position of a block."""
    ar = lockstep(*pair, "ar", max_new_tokens=8)
    for k in range(8):
        for mode in MODES:
            d = lockstep(*pair, mode, eos=ar.output_ids[k], block_size=4, max_new_tokens=12)
            assert d.finish_reason == "stop" or mode == "diffusion"  # lossless modes stop where AR does


def test_shapes_are_few():
    """A pass is cut into segments of a few widths; windows and capacities come in buckets."""
    widths = {w for t in range(1, 2000) for *_, w in segments(Attn("causal"), t)}
    assert widths == set(range(1, 17)) | {64, 256}
    assert [s[3] for s in segments(Attn("quad_first", block=4, prefix=300), 304)] == [256, 64, 4]
    assert {window_bucket(n, 1 << 20) for n in range(1, 20000)} == {256 << i for i in range(8)}
    assert capacity_bucket(257) == 512 and window_bucket(300, 512) == 512


def test_no_graph_break_no_recompile_after_warmup(tmp_path):
    """512 tokens in each mode on the demo model: every step function compiles once per shape and
    bucket with 0 graph breaks, and a second generation compiles nothing."""
    from torch._dynamo.utils import counters

    from edge_dlm.runtime import load

    rt = load(device="cpu", dtype="float32", engine="torch", compile="off")
    compiled.enable(rt.model, tmp_path)
    seen = set()
    step = rt.model.step

    def spy(tokens, positions, length, k, v, attn, window, use_lora, last, pick=None, sample=None, draw=None):
        seen.add((tokens.shape[1], attn, window, use_lora and rt.has_lora, last is None, k.shape, pick, sample))
        return step(tokens, positions, length, k, v, attn, window, use_lora, last, pick, sample, draw)

    rt.model.step = spy
    # no EOS, so every run is 512 tokens: the stop token becomes the mask id, which is never picked
    rt.model.config = dataclasses.replace(rt.model.config, eos_token_id=rt.model.config.mask_token_id)
    # two prompts of different lengths whose prefills pad to the same width
    prompts = ["Tell me a long story about the sea, the ships on it and the people who sail them",
               "Write a poem about a mountain, a river and the old town that lies between them, where nobody lives any more"]
    lengths = [len(rt.encode(p)) for p in prompts]
    assert lengths[0] != lengths[1] and all(16 < n <= 64 for n in lengths)
    for mode in MODES:
        kw = dict(mode=mode, max_new_tokens=512, block_size=4)
        # this model's graphs (`step.fns`): dynamo's global counters also count other models' compiles
        graphs, keys = len(step.fns), set(seen)
        r = rt.generate(prompts[0], **kw)  # warm-up
        assert r.finish_reason == "length" and len(r.output_ids) == 512
        assert not counters["graph_break"], dict(counters["graph_break"])
        # one graph per new pass shape and bucket (modes share some: the prefill, AR's step)
        assert len(step.fns) - graphs == len(seen - keys) and not step.eager, mode
        warm = dict(step.fns)
        rt.generate(prompts[1], **kw)
        assert step.fns == warm, mode  # no recompilation once warm
    assert {w for _, _, w, *_ in seen} == {256, 512, 1024}  # the window grew past 256, then 512 tokens
    assert not counters["graph_break"]


def test_auto_compiles_where_calibration_measured_it_faster():
    """`--compile auto` is eager until `edge-dlm calibrate` has compiled the passes on this machine
    and found them faster (so a first answer never waits for a cold compile); then it compiles."""
    from edge_dlm.cli.calibrate import measure_compile
    from edge_dlm.model.store import compiled_cache, compiled_key, record
    from edge_dlm.runtime import load

    rt = load(device="cpu", compile="auto")
    assert not rt.model.compiled and "compiled" not in rt.precision
    key = compiled_key(rt)
    record(compiled_cache(), key, eager=200.0, compiled=100.0)
    assert not load(device="cpu", compile="auto").model.compiled
    got = measure_compile(rt, tokens=16, runs=1)  # compiles ahead, measures, records
    assert got["eager_tokens_per_s"] > 0 and got["compiled_tokens_per_s"] > 0
    assert not rt.model.compiled  # measuring leaves the runtime as it was
    record(compiled_cache(), key, eager=100.0, compiled=200.0)
    fast = load(device="cpu", compile="auto")
    assert fast.model.compiled and "compiled" in fast.precision
    assert compiled_key(fast) == key  # the key does not depend on the compile state


def test_compile_flag(tmp_path):
    """`--compile on` emits what `--compile off` emits; a bad combination is one line, exit 2."""
    import json
    import subprocess
    import sys

    def gen(*flags):
        return subprocess.run([sys.executable, "-m", "edge_dlm.cli", "generate", "--prompt", "Hello there",
                               "--mode", "linear-spec", "--max-new-tokens", "24", "--json", "--device", "cpu", *flags],
                              capture_output=True, text=True)
    on, off = gen("--compile", "on"), gen("--compile", "off")
    assert on.returncode == off.returncode == 0, on.stderr
    assert json.loads(on.stdout)["output_ids"] == json.loads(off.stdout)["output_ids"]
    bad = gen("--compile", "on", "--kernels", "sideways")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_each_key_runs_its_own_graph(pair):
    """Each pass key runs its own graph, unguarded once built (`StepFunctions`): passes of
    different widths, patterns, windows and head rows, interleaved, each give the eager pass's logits,
    and the projections of narrow passes are the compiled reduction (`RowsLinear`), not the GEMM."""
    eager, fast = pair
    assert isinstance(fast.encoder.layers[0].mlp.up_proj, compiled.RowsLinear)
    assert type(fast.diffusion_head) is torch.nn.Linear  # its logits feed several reductions
    cases = [(1, "causal", 40, False), (4, "block", 40, False), (1, "causal", 300, False), (4, "causal", 40, True),
             (1, "causal", 40, True), (4, "block", 300, False), (1, "causal", 40, False), (8, "block", 40, False)]
    known = []
    for _ in range(2):
        for t, kind, length, last in cases:
            outs = []
            for model in (eager, fast):
                cache = model.new_cache(512)
                cache._set_length(length)
                tokens = torch.arange(5, 5 + t)[None]
                positions = torch.arange(length, length + t)[None]
                with torch.inference_mode():
                    window = cache.begin(t)
                    tail = torch.full((1,), t - 1) if last else None
                    outs.append(model.step(tokens, positions, cache.length_t, cache.k, cache.v, Attn(kind), window,
                                           False, tail))
            torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
        known.append(set(fast.step.keys))
    assert known[0] == known[1]  # the second round compiled nothing
    assert all(isinstance(fn, functools.partial) for fn in fast.step.fns.values())  # each key: dynamo's code, direct


def test_global_state_changes_after_warmup(pair):
    """Dynamo also guards the process's state (threads, grad and precision modes): a change after
    warm-up that a CPU graph depends on compiles anew (threads: part of the key), one it does not (a CUDA
    flag) runs the same graph, and neither fails or runs a graph traced for other state."""
    eager, fast = pair

    def logits(model):
        cache = model.new_cache(64)
        cache._set_length(7)
        with torch.inference_mode():
            window = cache.begin(1)
            return model.step(torch.tensor([[9]]), torch.tensor([[7]]), cache.length_t, cache.k, cache.v,
                              Attn("causal"), window, False, None)

    want = logits(eager)
    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    try:
        for _ in range(2):
            torch.testing.assert_close(logits(fast), want, atol=1e-4, rtol=1e-4)
        torch.set_num_threads(2 if threads == 1 else 1)
        torch.testing.assert_close(logits(fast), want, atol=1e-4, rtol=1e-4)
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        torch.testing.assert_close(logits(fast), want, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_the_cpu_kernels_compile_whole(tiny_model, tmp_path, weights):
    """bf16 and int8 / int4 models run their matmuls through the C kernels (`cpu_matmul`) inside the
    compiled passes too: no graph break (and for int4, the eager path's tokens)."""
    from torch._dynamo.utils import counters

    from edge_dlm.kernels import cpu_build
    from edge_dlm.kernels.backend import Backend
    from edge_dlm.model.quant import QuantSpec, prepare_layouts
    from edge_dlm.model.quantize import quantize_model

    if cpu_build.available() or not cpu_build.usable():
        pytest.skip("no C compiler for the CPU kernels")
    eager = copy.deepcopy(tiny_model)
    if weights == "bf16":
        eager = eager.to(torch.bfloat16)
    else:
        quantize_model(eager, QuantSpec("int4", group_size=32))
    assert Backend(cpu=True).apply(eager)
    prepare_layouts(eager)
    fast = copy.deepcopy(eager)
    counters.clear()
    compiled.enable(fast, tmp_path)
    for mode in ("ar", "linear-spec"):
        if weights == "int4":  # float32 activations: the eager path's tokens and cache
            lockstep(eager, fast, mode, block_size=4, max_new_tokens=12)
        else:  # bf16: inductor keeps float32 between the ops it fuses where eager rounds each, so a
            # near tie of a random model's logits can fall either way: the passes run, whole
            opts = GenerationOptions(mode=mode, block_size=4, max_new_tokens=12).resolve(fast.config.block_size)
            dec = Decoder(fast, opts, fast.new_cache(len(PROMPT) + 12 + opts.scratch_tokens()))
            list(mode_fn(mode)(dec, PROMPT))
            assert dec.output_ids and dec.nfe > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    kinds = {type(m).__name__ for m in fast.modules()}
    assert ("Bf16Linear" if weights == "bf16" else "QuantLinear") in kinds
