"""The decoding contract (`decoding.md`): lossless speculation, NFE counts, cache state, no mask."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import reference_kv, run_mode
from edge_dlm.decoding import Canvas, Draft, Emit

PROMPT = [1, 40, 41, 42, 43, 44]
BLOCKS = [1, 2, 3, 4, 8, 32]


def emitted(events) -> list[int]:
    return [t for e in events if isinstance(e, Emit) for t in e.ids]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec"])
def test_speculative_modes_equal_ar(tiny_model, mode, block):
    ar, _ = run_mode(tiny_model, PROMPT, "ar", max_new_tokens=48)
    spec, events = run_mode(tiny_model, PROMPT, mode, max_new_tokens=48, block_size=block)
    assert spec.output_ids == ar.output_ids
    assert spec.finish_reason == ar.finish_reason
    cycles = sum(isinstance(e, Draft) for e in events)
    # NFE exactly as the contract counts them
    assert spec.nfe == (1 + 2 * cycles if mode == "linear-spec" else 1 + cycles)
    assert ar.nfe == 1 + (ar.stream_len - 1)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_one_host_synchronization_per_cycle_or_step(tiny_model, mode, temperature):
    """Picks reach the host once per AR step, denoising step or speculative cycle (greedy: made inside
    the passes; sampled eagerly: drawn on the device from the logits): LinearSpec's draft picks go to
    its verify pass on the device, and both passes' picks come back together."""
    dec, events = run_mode(tiny_model, PROMPT, mode, max_new_tokens=40, block_size=4, temperature=temperature,
                           seed=3)
    cycles = sum(isinstance(e, (Draft, Canvas)) for e in events)
    if mode == "ar":
        assert dec.syncs == dec.nfe  # one pass per token
    elif mode == "diffusion":  # prefill + denoising steps + the commit passes
        assert dec.syncs == dec.nfe and cycles < dec.nfe
    elif mode == "quadratic-spec" and temperature:  # sampled eagerly, from the logits: the accepted count
        assert dec.syncs == 1 + 2 * cycles  # says which mask rows to draw the next draft from
    else:  # prefill (QuadraticSpec: its first pass) + one per cycle, whatever the passes per cycle
        assert dec.syncs == 1 + cycles and dec.nfe == (1 + 2 * cycles if mode == "linear-spec" else 1 + cycles)


def test_diffusion_with_block_one_is_ar(tiny_model):
    ar, _ = run_mode(tiny_model, PROMPT, "ar", max_new_tokens=40)
    dif, events = run_mode(tiny_model, PROMPT, "diffusion", max_new_tokens=40, block_size=1)
    assert dif.output_ids == ar.output_ids and dif.nfe == ar.nfe
    assert not any(isinstance(e, Canvas) for e in events)  # no masks, no denoising passes


@pytest.mark.parametrize("block,steps", [(4, 1), (4, 2), (4, 4), (8, 3), (32, 8)])
def test_diffusion_nfe_and_no_mask(tiny_model, block, steps):
    dec, events = run_mode(tiny_model, PROMPT, "diffusion", max_new_tokens=64, block_size=block,
                           steps=steps, threshold=1.0)
    m = tiny_model.config.mask_token_id
    assert m not in dec.output_ids
    blocks = sum(isinstance(e, Emit) for e in events)
    denoise = sum(isinstance(e, Canvas) for e in events)
    assert dec.nfe == 1 + denoise + (blocks - 1)
    if dec.finish_reason == "length":  # no EOS: every block used its full step budget but the last
        assert blocks == math.ceil(64 / block)
        assert denoise <= blocks * min(steps, block - 1)
    # each step committed ceil(r / (S - s)) positions at least
    for e in events:
        if isinstance(e, Canvas):
            assert e.committed
    # the canvas only ever loses masks
    for e in events:
        if isinstance(e, Canvas) and e.step == min(steps, block - 1) - 1:
            assert m not in e.tokens[:min(block, 64)]


def test_diffusion_threshold_commits_confident_positions(tiny_model):
    # threshold 0 commits every masked position in the first step
    dec, events = run_mode(tiny_model, PROMPT, "diffusion", max_new_tokens=16, block_size=4, steps=4,
                           threshold=0.0)
    canv = [e for e in events if isinstance(e, Canvas)]
    assert all(e.step == 0 and len(e.committed) == 3 for e in canv)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_cache_equals_ar_cache_after_every_cycle(tiny_model, mode):
    stream: list[int] = []
    checked = []

    def check(dec, ev):
        if isinstance(ev, Emit):
            stream.extend(ev.ids)
        if isinstance(ev, (Emit, Canvas)) and dec.cache.length > len(PROMPT):
            seq = (PROMPT + stream)[:dec.cache.length]
            k_ref, v_ref = reference_kv(tiny_model, seq)
            k, v = dec.cache.committed()
            assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)
            checked.append(dec.cache.length)

    run_mode(tiny_model, PROMPT, mode, max_new_tokens=24, block_size=4, on_event=check)
    assert len(checked) >= 3


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
@pytest.mark.parametrize("budget", [1, 2, 5])
def test_budget_is_exact(tiny_model, mode, budget):
    dec, _ = run_mode(tiny_model, PROMPT, mode, max_new_tokens=budget, block_size=4)
    assert dec.stream_len == budget or dec.finish_reason == "stop"
    assert len(dec.output_ids) <= budget


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_sampling_is_seeded_and_never_emits_mask(tiny_model, mode):
    a, _ = run_mode(tiny_model, PROMPT, mode, max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9,
                    seed=7, block_size=4)
    b, _ = run_mode(tiny_model, PROMPT, mode, max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9,
                    seed=7, block_size=4)
    assert a.output_ids == b.output_ids
    assert tiny_model.config.mask_token_id not in a.output_ids


def test_eos_stops_every_mode(tiny_model):
    """Force EOS by making it the argmax after a few tokens: each mode stops there, EOS excluded."""
    ar, _ = run_mode(tiny_model, PROMPT, "ar", max_new_tokens=10)
    eos = tiny_model.config.eos_token_id
    head = tiny_model.diffusion_head.weight
    saved = head[eos].clone()
    # give EOS a head row 3x that of the 3rd AR token: EOS now wins wherever that token was likely
    with torch.no_grad():
        head[eos] = head[ar.output_ids[2]] * 3
    try:
        ref, _ = run_mode(tiny_model, PROMPT, "ar", max_new_tokens=30)
        assert ref.finish_reason == "stop"
        for mode in ("linear-spec", "quadratic-spec"):
            d, _ = run_mode(tiny_model, PROMPT, mode, max_new_tokens=30, block_size=4)
            assert d.output_ids == ref.output_ids and d.finish_reason == "stop"
        d, _ = run_mode(tiny_model, PROMPT, "diffusion", max_new_tokens=30, block_size=4)
        assert d.finish_reason == "stop" and eos not in d.output_ids
    finally:
        with torch.no_grad():
            head[eos] = saved


# ---- a tiny model trained on a structured language: the acceptance paths for real -------------

@pytest.fixture(scope="module")
def counting_model():
    """Trained in seconds with the joint AR + diffusion objective on 'count up by one' sequences,
    so drafts are often right and speculation really accepts several tokens per cycle."""
    from edge_dlm.model.nld import NLDModel
    from edge_dlm.model.testing import tiny_config
    from edge_dlm.model.training import init_weights, train

    torch.manual_seed(0)
    cfg = tiny_config(64, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                      block_size=4, yarn=False)
    model = NLDModel(cfg)
    init_weights(model, seed=0)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            start = torch.randint(6, 64, (32, 1), generator=g)
            yield 6 + (start - 6 + torch.arange(24)) % 58  # ids 6..63, counting with wrap-around

    train(model, batches(), steps=400, lr=3e-3, warmup=20, seed=0)
    return model.requires_grad_(False)


def test_trained_model_accepts_many_tokens_and_stays_lossless(counting_model):
    prompt = [1, 20, 21, 22, 23]
    ar, _ = run_mode(counting_model, prompt, "ar", max_new_tokens=40)
    assert ar.output_ids[:5] == [24, 25, 26, 27, 28]  # it learned the language
    for mode in ("linear-spec", "quadratic-spec"):
        spec, _ = run_mode(counting_model, prompt, mode, max_new_tokens=40)
        assert spec.output_ids == ar.output_ids
        assert spec.cycle_tokens / spec.cycles > 2, mode
        assert spec.nfe < ar.nfe
    dif, _ = run_mode(counting_model, prompt, "diffusion", max_new_tokens=40, steps=2)
    assert dif.nfe < ar.nfe
    assert sum(a == b for a, b in zip(dif.output_ids, ar.output_ids)) >= 20  # lossy, but close


@pytest.mark.parametrize("sampling", [dict(temperature=0.9), dict(temperature=1.1, top_k=7),
                                      dict(temperature=0.8, top_k=20, top_p=0.85), dict(temperature=1.0, top_p=0.9)])
def test_picks_made_in_the_pass_are_the_samplers(tiny_model, sampling, monkeypatch):
    """Every mode, seeded: the tokens picked inside the passes (with the tensor ops a compiled pass runs:
    the model marked compiled) are those the sampler draws from the passes' logits (its random numbers
    made on the host): a row's random number is a function of the seed and the position it picks for,
    whoever makes it.
    Top-p alone is drawn from the logits in both runs (its candidates grow by reading their mass)."""
    runs = {}
    for compiled in (True, False):
        monkeypatch.setattr(tiny_model, "compiled", compiled)
        runs[compiled] = [(d.picks_in_pass, d.output_ids, d.nfe) for d in (
            run_mode(tiny_model, PROMPT, mode, max_new_tokens=24, block_size=4, seed=9, **sampling)[0]
            for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"))]
    for fast, slow in zip(runs[True], runs[False]):
        assert fast[0] == (sampling.get("top_k", 0) > 0 or "top_p" not in sampling) and not slow[0]
        assert fast[1:] == slow[1:]
    seeds = [run_mode(tiny_model, PROMPT, "ar", max_new_tokens=24, seed=s, **sampling)[0].output_ids for s in (9, 10)]
    assert seeds[0] != seeds[1]  # the seed matters


@pytest.mark.parametrize("sampling", [dict(temperature=0.8), dict(temperature=1.0, top_k=20, top_p=0.9),
                                      dict(temperature=0.7, top_p=0.8)])
def test_seeded_speculative_modes_equal_seeded_ar(tiny_model, sampling, monkeypatch):
    """With seeded sampling, LinearSpec and QuadraticSpec emit AR's tokens: every pick's random number
    is keyed by the seed and the position it picks for, so a verify row draws what the AR step for that
    position draws, from the same distribution (the same prefix), and a rejected draft ends the cycle on
    AR's token. Eager and in-pass picks alike; with the LoRA drafter on and off; several seeds."""
    for compiled in (False, True):
        monkeypatch.setattr(tiny_model, "compiled", compiled)
        for seed in (1, 2, 3):
            ar = run_mode(tiny_model, PROMPT, "ar", max_new_tokens=40, seed=seed, **sampling)[0]
            for mode in ("linear-spec", "quadratic-spec"):
                for lora in (True, False):
                    d = run_mode(tiny_model, PROMPT, mode, max_new_tokens=40, block_size=4, seed=seed,
                                 use_lora=lora, **sampling)[0]
                    assert d.output_ids == ar.output_ids, (mode, lora, seed, sampling, compiled)
