"""Weight-only quantization: error bounds, quantized models close to fp32, lossless modes still lossless."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_dlm.decoding import Draft
from edge_dlm.primitives.errors import UserError
from edge_dlm.model.quant import (NF4Linear, QuantLinear, QuantSpec, dequantize, pack_int4, quantize, unpack_int4,
                                  weight_bytes)
from edge_dlm.model import quant
from edge_dlm.model.quantize import quantize_model
from helpers import run_mode

PROMPT = [1, 40, 41, 42, 43, 44]
OWN = [(s, g, sym) for s in ("int8", "int4") for g in (32, 64, 128) for sym in (True, False)]


@pytest.mark.parametrize("scheme,group,symmetric", OWN)
def test_roundtrip_within_half_a_step(scheme, group, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g) * 3  # rows of varied scale
    w[0, 5] = 40.0  # an outlier only widens its own group's step
    bits = 8 if scheme == "int8" else 4
    t = quantize(w, bits, group, symmetric)
    back = dequantize(t["qweight"], t["scales"], t.get("zeros"), bits)
    step = t["scales"].float().repeat_interleave(group, dim=1)
    # round-to-nearest on a grid of step s, nothing clipped: |w - w'| <= s / 2 (+ fp32 rounding)
    assert ((w - back).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()
    assert ((w - back).abs() / step).max() > 0.4  # the bound is tight, not vacuous
    levels = t["qweight"].unique().numel() if bits == 8 else unpack_int4(t["qweight"], symmetric).unique().numel()
    assert levels <= 2 ** bits
    stored = sum(v.numel() * v.element_size() for v in t.values())
    assert stored < w.numel() * 2 * (bits + 16 * (2 - symmetric) / group) / 16 + 1  # bits + scale (+ zero)


@pytest.mark.parametrize("scheme,symmetric", [("int8", True), ("int4", True), ("int4", False)])
def test_quantizing_in_pieces_is_quantizing_the_whole(scheme, symmetric, monkeypatch):
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    whole = quant.quantize(w, QuantSpec(scheme).bits, 32, symmetric)
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 7)  # a 131072-row head is quantized 4096 rows at a time
    pieces = quant.quantize(w, QuantSpec(scheme).bits, 32, symmetric)
    assert whole.keys() == pieces.keys() and all(torch.equal(whole[k], pieces[k]) for k in whole)


def test_int4_packing_roundtrip():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q), signed=True), q)
    u = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(u), signed=False), u.to(torch.int8))


def test_nf4_roundtrip_within_half_the_widest_code_gap():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import get_4bit_type

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    lin = NF4Linear.from_weight(w, QuantSpec("nf4", group_size=64))
    code = get_4bit_type("nf4", device="cpu").float().sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2  # nearest-code rounding of w / absmax
    absmax = w.reshape(-1, 64).abs().amax(-1, keepdim=True)
    err = (w.reshape(-1, 64) - lin.dequantize().reshape(-1, 64)).abs()
    assert (err <= absmax * half_gap * (1 + 1e-3) + 1e-6).all()


def test_unsupported_group_size_is_a_user_error():
    with pytest.raises(UserError, match="group size 48 not supported"):
        QuantSpec("int4", group_size=48)
    with pytest.raises(UserError, match="not supported; known"):
        QuantSpec("int3")


def quantized(model, scheme, **kw):
    if scheme in ("nf4", "llm-int8"):
        pytest.importorskip("bitsandbytes")
    return quantize_model(copy.deepcopy(model), QuantSpec(scheme, **kw))


# Relative logit error ||q - f|| / ||f|| on the bundled (trained) demo model, 64 tokens, group 64.
# Measured: int8 0.0039, int4 0.062 (asymmetric 0.053), nf4 0.053, llm-int8 0.0038.
LOGIT_TOL = {"int8": 0.01, "int4": 0.1, "nf4": 0.1, "llm-int8": 0.01}
# Weight bytes over the fp32 model's (the demo's embedding + head are half its weights; llm-int8 and
# nf4 leave the embedding in float).
BYTES_RATIO = {"int8": 0.27, "int4": 0.14, "nf4": 0.36, "llm-int8": 0.44}


@pytest.fixture(scope="module")
def demo_model():
    from edge_dlm.hub import DEMO_MODEL
    from edge_dlm.model.weights import load_model

    return load_model(DEMO_MODEL)


@pytest.mark.parametrize("scheme", list(LOGIT_TOL))
def test_quantized_logits_close_to_fp32(demo_model, scheme):
    qm = quantized(demo_model, scheme)
    x = torch.randint(5, 4000, (1, 64), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(64)[None]
    with torch.no_grad():
        ref, got = demo_model(x, pos), qm(x, pos)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"{scheme}: relative logit error {rel:.4f}")
    assert 0 < rel < LOGIT_TOL[scheme]
    assert weight_bytes(qm) < weight_bytes(demo_model) * BYTES_RATIO[scheme]


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec"])
def test_speculative_modes_equal_ar_on_quantized_weights(tiny_model, scheme, mode):
    qm = quantized(tiny_model, scheme, group_size=32, symmetric=scheme != "int4")
    ar, _ = run_mode(qm, PROMPT, "ar", max_new_tokens=24)
    spec, _ = run_mode(qm, PROMPT, mode, max_new_tokens=24)
    assert spec.output_ids == ar.output_ids


def test_lora_drafter_on_quantized_weights(tiny_model):
    qm = quantized(tiny_model, "int4", group_size=32)
    assert isinstance(qm.encoder.layers[0].self_attn.o_proj, QuantLinear)
    assert qm.encoder.layers[0].self_attn.o_lora is not None  # kept in float, applied on top
    ar, _ = run_mode(qm, PROMPT, "ar", max_new_tokens=24)
    on, ev_on = run_mode(qm, PROMPT, "linear-spec", max_new_tokens=24)
    off, ev_off = run_mode(qm, PROMPT, "linear-spec", max_new_tokens=24, use_lora=False)
    assert on.output_ids == off.output_ids == ar.output_ids
    assert [e.tokens for e in ev_on if isinstance(e, Draft)] != [e.tokens for e in ev_off if isinstance(e, Draft)]


def test_quant_kernel_hook_is_used(tiny_model):
    """A layer's kernel (what a backend gives it) runs its matmul on its device, and only there."""
    qm = quantized(tiny_model, "int8")
    calls = []

    class Hook:
        device_type = "cpu"

        def __call__(self, x, mod):
            calls.append(mod.out_features)
            return torch.nn.functional.linear(x, mod.dequantize(x.dtype))

    layers = [m for m in qm.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.kernel = Hook()
    run_mode(qm, PROMPT, "ar", max_new_tokens=2)
    assert len(calls) == 2 * (2 * 7 + 1)  # prefill (gives token 1) + 1 step; 7 linears x 2 layers + head
    Hook.device_type = "cuda"  # a kernel for another device: the reference runs here
    run_mode(qm, PROMPT, "ar", max_new_tokens=2)
    assert len(calls) == 2 * (2 * 7 + 1)


@pytest.mark.parametrize("m", [1, 2, 15, 16, 17, 32, 33, 272])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scheme,symmetric", [("int4", True), ("int4", False)])
def test_cpu_matmuls_match_reference(m, group, scheme, symmetric):
    """The CPU int4 kernels == dequantize + F.linear within their rounding (narrow passes: x to int8 per
    block of 32; wide ones: the weight and x to bf16)."""
    from edge_dlm.kernels import cpu_matmul
    from edge_dlm.kernels import cpu_build
    from edge_dlm.model.quant import linear_ref

    if not cpu_build.usable():
        pytest.skip("no C compiler for the CPU kernels")
    g = torch.Generator().manual_seed(m)
    mod = QuantLinear.from_weight(torch.randn(48, 256, generator=g) * 0.05, QuantSpec(scheme, group, symmetric))
    x = torch.randn(m, 256, generator=g)
    got = cpu_matmul.QUANT(x, mod)
    ref = linear_ref(x, mod)
    assert got is not None and got.dtype == torch.float32
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-2, err  # int8 activations: ~0.5% relative; bf16: ~2^-9 each
    if m == 1:  # a row's result does not depend on the other rows of the pass
        xs = torch.cat([x, torch.randn(15, 256, generator=g)])
        torch.testing.assert_close(cpu_matmul.QUANT(xs, mod)[:1], got, atol=0, rtol=0)


def test_cpu_matmul_declines_what_it_cannot_run():
    """Shapes and layouts the CPU kernels do not take fall back to the reference, same result."""
    from edge_dlm.kernels import cpu_matmul
    from edge_dlm.kernels import cpu_build
    from edge_dlm.model.quant import linear_ref

    odd = QuantLinear.from_weight(torch.randn(40, 96), QuantSpec("int4", 32))
    odd.perm = torch.randperm(96)  # act-order columns (GPTQ): the reference
    odd.kernel = cpu_matmul.QUANT
    if cpu_build.usable():
        assert cpu_matmul.QUANT(torch.randn(3, 96), odd) is None
    x = torch.randn(3, 96)
    torch.testing.assert_close(odd(x), linear_ref(x.index_select(-1, odd.perm), odd), atol=0, rtol=0)


def test_derived_layout_follows_the_module(tiny_model):
    """The kernel layout is rebuilt after a move and never written to the artifact."""
    from edge_dlm.kernels import cpu_matmul

    from edge_dlm.kernels import cpu_build

    if not cpu_build.usable():
        pytest.skip("no C compiler for the CPU kernels")
    qm = quantized(tiny_model, "int4", group_size=32)
    cpu_matmul.route_quant(qm)
    lin = qm.encoder.layers[0].mlp.gate_proj
    lin(torch.randn(2, lin.in_features))
    assert "cpu-x16" in lin._derived
    qm.to(torch.float32)
    assert lin._derived == {}
    assert not any("derived" in k or "cpu" in k for k in qm.state_dict())
