"""The int4 / int8 weight-only matmul kernel == its reference (dequantize, F.linear) for every pass width."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_dlm.kernels.quant_matmul import launch_config, quant_matmul, quant_matmul_ref
from edge_dlm.model.quant import QuantLinear, QuantSpec
from edge_dlm.model.quantize import quantize_model
from helpers import run_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)
ROWS = [1, 2, 15, 16, 17, 32, 33, 272]


def layer(bits: int, group: int, symmetric: bool, n: int = 48, k: int = 256, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, :group] *= 40  # one group with a large scale
    spec = QuantSpec("int4" if bits == 4 else "int8", group_size=group, symmetric=symmetric)
    return QuantLinear.from_weight(w, spec).to(DEVICE)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_parity_fp32(m, group, bits, symmetric):
    mod = layer(bits, group, symmetric, seed=m)
    x = torch.randn(m, mod.in_features, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    torch.testing.assert_close(quant_matmul(x, mod), quant_matmul_ref(x, mod), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17, 272])
def test_parity_half(dtype, m):
    mod = layer(4, 64, True)
    x = torch.randn(2, m, mod.in_features).to(DEVICE, dtype)  # leading dims are kept
    got, ref = quant_matmul(x, mod), quant_matmul_ref(x.float(), mod)
    assert got.dtype == dtype and got.shape == (2, m, mod.out_features)
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=2e-2)


def test_strided_rows():
    mod = layer(4, 32, True)
    x = torch.randn(6, 2 * mod.in_features).to(DEVICE)[:, ::2]  # a non-contiguous view
    torch.testing.assert_close(quant_matmul(x, mod), quant_matmul_ref(x, mod), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (32, 4096, 4096), (1, 14336, 4096), (1056, 4096, 14336)])
def test_launch_config_covers_k(m, n, k, monkeypatch):
    """Whatever the split, every K tile is read exactly once and lies inside one group."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for group in (32, 64, 128):
        bm, bn, bk, splits = launch_config(m, n, k, group)
        assert group % bk == 0 and k % (splits * bk) == 0 and bm >= min(m, 16)
        if m == 1:
            assert splits > 1 or n >= 8192  # few output tiles: K is split to fill the GPU


def test_model_through_kernel(tiny_model):
    """A quantized model decodes with the kernel as with the reference matmul, spec modes lossless."""
    qm = quantize_model(copy.deepcopy(tiny_model), QuantSpec("int4", group_size=32)).to(DEVICE)
    prompt = [1, 40, 41, 42, 43, 44]
    ref, _ = run_mode(qm, prompt, "ar", max_new_tokens=12)  # no kernel given: the reference matmuls

    class Routed:  # the Triton matmul as a layer's kernel (the backend gives it on CUDA; here also interpreted)
        device_type = torch.device(DEVICE).type

        def __call__(self, x, mod):
            return quant_matmul(x, mod)

    for m in qm.modules():
        if isinstance(m, QuantLinear):
            m.kernel = Routed()
    for mode in ("ar", "linear-spec", "quadratic-spec"):
        got, _ = run_mode(qm, prompt, mode, max_new_tokens=12)
        assert got.output_ids == ref.output_ids, mode
