"""The CPU int8 group-wise matmul: the reference's numbers, rows independent of the pass width, kept
whole inside a compiled pass, and the lossless modes still emitting AR's tokens on an int8 model."""

from __future__ import annotations

import pytest
import torch

from edge_dlm.kernels import cpu_matmul
from edge_dlm.model.quant import QuantLinear, QuantSpec, linear_ref

pytestmark = pytest.mark.skipif(bool(cpu_matmul.available()), reason="no C compiler")


def layer(out_f: int, in_f: int, group: int, seed: int = 0, symmetric: bool = True) -> QuantLinear:
    w = 0.05 * torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return QuantLinear.from_weight(w, QuantSpec("int8", group_size=group, symmetric=symmetric))


@pytest.mark.parametrize("out_f,in_f,group", [(64, 192, 32), (48, 512, 64), (40, 384, 128), (33, 224, 32)])
def test_matches_the_reference_and_rows_do_not_depend_on_the_width(out_f, in_f, group):
    mod = layer(out_f, in_f, group)
    x = torch.randn(cpu_matmul.MAX_ROWS, in_f, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([cpu_matmul.cpu_int8_matmul(x[i:i + 1], mod) for i in range(len(x))])
    torch.testing.assert_close(alone, linear_ref(x, mod), atol=1e-4, rtol=1e-4)
    for m in (2, 3, 4, 5, 7, 8, 16, 31, 32):  # every blocking of rows: bit for bit the 1-row results
        assert torch.equal(cpu_matmul.cpu_int8_matmul(x[:m], mod), alone[:m]), m


def test_declines_what_it_does_not_cover():
    x = torch.randn(1, 192)
    assert cpu_matmul.cpu_int8_matmul(x, layer(32, 192, 32, symmetric=False)) is None  # asymmetric
    wide, mod = torch.randn(cpu_matmul.MAX_ROWS + 1, 192), layer(32, 192, 32)  # past MAX_ROWS: the reference
    assert cpu_matmul.cpu_int8_matmul(wide, mod) is None
    torch.testing.assert_close(cpu_matmul.int8_dequant_mm(wide, mod.qweight, mod.scales, 32), linear_ref(wide, mod),
                               atol=0, rtol=0)  # ... which a compiled pass runs as one op


def test_a_compiled_pass_keeps_it_whole():
    from torch._dynamo.utils import counters

    mod = layer(64, 192, 32)
    scales = mod.scales.float().contiguous()

    def f(x):
        return torch.relu(cpu_matmul.int8_gemm(x, mod.qweight, scales, 32)) * 2

    x = torch.randn(3, 192)
    counters.clear()
    fast = torch.compile(f, fullgraph=True, dynamic=False)
    assert torch.equal(fast(x), f(x))
    assert not counters["graph_break"]


def test_lossless_modes_emit_ar_tokens_on_an_int8_model():
    from edge_dlm.runtime import load

    rt = load(device="cpu", quant="int8", group_size=32, compile="off")
    assert cpu_matmul.cpu_int8_matmul in __import__("edge_dlm.model.quant", fromlist=["_MATMULS"])._MATMULS.values()
    kw = dict(max_new_tokens=64, block_size=4)
    ar = rt.generate("Write a story about a cat", mode="ar", **kw).output_ids
    for mode in ("linear-spec", "quadratic-spec"):  # B = 4: every pass of these modes is <= 32 rows
        assert rt.generate("Write a story about a cat", mode=mode, **kw).output_ids == ar, mode


def test_bf16_matches_and_rows_do_not_depend_on_the_width():
    w = (0.05 * torch.randn(40, 224, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    x = torch.randn(cpu_matmul.MAX_ROWS, 224, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([cpu_matmul.bf16_gemm(x[i:i + 1], w) for i in range(len(x))])
    torch.testing.assert_close(alone, x.float() @ w.float().t(), atol=1e-4, rtol=1e-4)
    for m in (2, 3, 4, 5, 9, 32):
        assert torch.equal(cpu_matmul.bf16_gemm(x[:m], w), alone[:m]), m


def test_bf16_models_route_narrow_passes_and_stay_lossless():
    from edge_dlm.runtime import load

    rt = load(device="cpu", dtype="bfloat16", compile="off")
    lin = rt.model.encoder.layers[0].mlp.up_proj
    assert isinstance(lin, cpu_matmul.Bf16Linear)
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), (x.float() @ lin.weight.float().t()), atol=2e-2, rtol=2e-2)
    wide = torch.randn(cpu_matmul.MAX_ROWS + 1, lin.in_features, dtype=torch.bfloat16)
    assert torch.equal(lin(wide), torch.nn.functional.linear(wide, lin.weight))  # torch's GEMM past MAX_ROWS
    kw = dict(max_new_tokens=64, block_size=4)
    ar = rt.generate("Write a story about a cat", mode="ar", **kw).output_ids
    for mode in ("linear-spec", "quadratic-spec"):
        assert rt.generate("Write a story about a cat", mode=mode, **kw).output_ids == ar, mode
