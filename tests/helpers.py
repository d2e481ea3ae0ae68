"""Test helpers: run a decoding mode directly on a model; the K/V an AR run would hold."""

from __future__ import annotations

import torch

from edge_dlm.decoding import Decoder, GenerationOptions, mode_fn
from edge_dlm.sampling import SamplingParams


def run_mode(model, prompt_ids: list[int], mode: str, *, on_event=None, **kw):
    """Run one mode on `model` directly; returns (decoder, events)."""
    sampling = SamplingParams(**{k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in kw})
    opts = GenerationOptions(mode=mode, sampling=sampling, **kw).resolve(model.config.block_size)
    cache = model.new_cache(len(prompt_ids) + opts.max_new_tokens + opts.scratch_tokens())
    dec = Decoder(model, opts, cache)
    events = []
    for ev in mode_fn(mode)(dec, prompt_ids):
        events.append(ev)
        if on_event is not None:
            on_event(dec, ev)
    return dec, events


def reference_kv(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V an AR run holds after caching `ids`: one causal pass from an empty cache."""
    from edge_dlm.attention import CAUSAL

    cache = model.new_cache(len(ids))
    with torch.inference_mode():
        model(torch.tensor([ids]), torch.arange(len(ids))[None], cache=cache, attn=CAUSAL)
    cache.commit(len(ids))
    return cache.committed()

