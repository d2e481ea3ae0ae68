"""Test helpers: run a decoding mode directly on a model; the K/V an AR run would hold."""

from __future__ import annotations

import socket

import torch

from edge_dlm.decoding import Decoder, GenerationOptions, mode_fn
from edge_dlm.primitives.sampling import SamplingParams


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
    from edge_dlm.primitives.attention import CAUSAL

    cache = model.new_cache(len(ids))
    with torch.inference_mode():
        model(torch.tensor([ids]), torch.arange(len(ids))[None], cache=cache, attn=CAUSAL)
    cache.commit(len(ids))
    return cache.committed()



# ---- fake power hardware ------------------------------------------------------------------------

class FakeMeter:
    """An energy counter drawing a constant `watts` (a `power.EnergyMeter` stand-in); `watts=None`: none."""

    def __init__(self, watts: float | None = 10.0, clock=None) -> None:
        import time

        self.watts = watts
        self.clock = clock or time.perf_counter
        self.source = "fake" if watts is not None else "n/a"
        self.why = "" if watts is not None else "no meter in this test"

    def read(self) -> float | None:
        return None if self.watts is None else self.watts * self.clock()


class Ticks:
    """A clock that advances `step` seconds at every reading: meters and samplers that share it measure
    exactly, whatever the machine is doing."""

    def __init__(self, step: float = 0.25) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def fake_power_supply(root, *, ac: bool | None = True, battery: str | None = None, power_uw: int | None = None,
                      current_ua: int | None = None, voltage_uv: int | None = None):
    """A `/sys/class/power_supply` tree: an AC adapter (online or not) and a battery with this status."""
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if ac is not None:
        (root / "AC").mkdir(exist_ok=True)
        (root / "AC" / "type").write_text("Mains\n")
        (root / "AC" / "online").write_text("1\n" if ac else "0\n")
    if battery is not None:
        b = root / "BAT0"
        b.mkdir(exist_ok=True)
        (b / "type").write_text("Battery\n")
        (b / "status").write_text(battery + "\n")
        for name, v in (("power_now", power_uw), ("current_now", current_ua), ("voltage_now", voltage_uv)):
            if v is not None:
                (b / name).write_text(f"{v}\n")
    return root


def raw(port: int, data: bytes, timeout: float = 20) -> bytes:
    """Send `data`, then read until the server closes. An answer that arrives is returned even when the
    server stopped reading early (the send or the half-close then fails); a reset before any byte of an
    answer arrived returns b"" (the callers assert an answer)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while c := s.recv(65536):
                chunks.append(c)
        except ConnectionResetError:
            pass
    return b"".join(chunks)
