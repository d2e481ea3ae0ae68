"""The model with the kernels switched on decodes exactly as with SDPA, in every mode."""

from __future__ import annotations

import copy

import pytest
import torch

import edge_dlm
from edge_dlm import kernels
from edge_dlm.kernels.backend import Backend
from edge_dlm.primitives.errors import UserError
from helpers import run_mode

PROMPT = [1, 40, 41, 42, 43, 44]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model where the kernels run: the GPU when there is one (fp32 there too)."""
    return copy.deepcopy(tiny_model).to(DEVICE)


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("diffusion", {"steps": 2}), ("linear-spec", {}),
                                     ("quadratic-spec", {})])
def test_modes_equal_with_kernels(model, mode, kw):
    fused = copy.deepcopy(model)
    Backend(triton=True).apply(fused)
    ref, _ = run_mode(model, PROMPT, mode, max_new_tokens=10, **kw)
    got, _ = run_mode(fused, PROMPT, mode, max_new_tokens=10, **kw)
    assert got.output_ids == ref.output_ids and got.nfe == ref.nfe
    with torch.no_grad():  # logits of one cached block pass agree closely too
        from edge_dlm.primitives.attention import BLOCK

        outs = []
        for m in (model, fused):
            cache = m.new_cache(16)
            m(torch.tensor([PROMPT], device=DEVICE), torch.arange(6, device=DEVICE)[None], cache=cache,
              attn=edge_dlm.primitives.attention.CAUSAL)
            cache.commit(6)
            outs.append(m(torch.tensor([[5, 3, 3, 3]], device=DEVICE), torch.arange(6, 10, device=DEVICE)[None],
                          cache=cache, attn=BLOCK))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("diffusion", {"steps": 2}), ("diffusion", {"steps": 4, "threshold": 0.3}),
                                     ("linear-spec", {}), ("linear-spec", {"block_size": 1}),
                                     ("quadratic-spec", {}), ("quadratic-spec", {"block_size": 2})])
def test_kernel_passes_pick_as_the_torch_passes(model, mode, kw):
    """With the kernels on (Triton attention and the fused greedy pick inside each pass) every mode
    runs its one path and emits the torch passes' tokens, NFE and events, one sync per cycle or step."""
    from edge_dlm.kernels.attention import block_attention
    from edge_dlm.kernels.verify import greedy_pick

    events = {}
    for fused in (False, True):
        model.attn_kernel, model.pick_kernel = (block_attention, greedy_pick) if fused else (None, None)
        try:
            dec, seen = run_mode(model, PROMPT, mode, max_new_tokens=12, **kw)
        finally:
            model.attn_kernel = model.pick_kernel = None
        events[fused] = (dec.output_ids, dec.nfe, seen)
    assert events[True][:2] == events[False][:2]
    assert events[True][2] == events[False][2]  # the same Canvas / Draft / Emit events


def test_runtime_kernels_switch(tiny_ckpt):
    rt = edge_dlm.load(tiny_ckpt, device=DEVICE, dtype="float32", kernels="on")  # CPU: the interpreter, when asked for
    assert rt.kernels and rt.model.attn_kernel is not None
    off = edge_dlm.load(tiny_ckpt, device=DEVICE, dtype="float32", kernels="off")
    a = rt.generate([1, 40, 41], mode="linear-spec", max_new_tokens=8)
    b = off.generate([1, 40, 41], mode="linear-spec", max_new_tokens=8)
    assert a.output_ids == b.output_ids
    assert edge_dlm.load(tiny_ckpt, device=DEVICE).kernels == (DEVICE == "cuda")  # auto: never the interpreter
    with pytest.raises(UserError, match="known: auto, on, off"):
        edge_dlm.load(tiny_ckpt, device="cpu", kernels="fast")


def test_kernels_on_without_a_gpu_is_explained(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reasons = kernels.status("cpu")
    assert not ok and "not CUDA" in reasons[0]
    assert kernels.resolve("on", "cpu") is False  # on a CPU, `on` means the C kernels (`cpu_resolve`)
    from edge_dlm.kernels import cpu_build

    monkeypatch.setattr(cpu_build, "available", lambda: ["no C compiler (cc) to build the CPU matmul kernels"])
    with pytest.raises(UserError, match="cannot run here: no C compiler"):
        kernels.cpu_resolve("on")
    assert kernels.cpu_resolve("auto") is False and kernels.cpu_resolve("off") is False
