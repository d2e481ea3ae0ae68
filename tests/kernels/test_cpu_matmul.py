"""The CPU matmul kernels (`edge_dlm.kernels.cpu_matmul`): the reference's numbers within the rounding
each one documents, rows independent of the pass width, kept whole inside a compiled pass, the
portable build (no AVX-512) agreeing, and the lossless modes still emitting AR's tokens."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from edge_dlm.kernels import cpu_build, cpu_ctypes, cpu_matmul
from edge_dlm.model.quant import QuantLinear, QuantSpec, linear_ref

pytestmark = pytest.mark.skipif(bool(cpu_build.available()), reason="; ".join(cpu_build.available()) or "-")

SHAPES = [(64, 192, 32), (48, 512, 64), (40, 384, 128), (33, 256, 32), (33, 224, 32)]


def layer(scheme: str, out_f: int, in_f: int, group: int, seed: int = 0, symmetric: bool = True) -> QuantLinear:
    w = 0.05 * torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return QuantLinear.from_weight(w, QuantSpec(scheme, group_size=group, symmetric=symmetric))


def needs_bf16() -> None:
    """A build without a bf16 vector path (the generic one) leaves bf16 to torch: nothing to test."""
    if not cpu_build.simd()["bf16"]:
        pytest.skip(f"the {cpu_build.variant()[0]} build has no bf16 kernel (torch's serves bf16 there)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def documented(x: torch.Tensor, mod: QuantLinear) -> torch.Tensor:
    """The narrow kernels' arithmetic as the module docstring states it, in float64: x rounded to int8
    per block of 32 (d = max|x| / 127, round half to even), exact integer dot products with the stored
    q, scaled per block by s * d (+ z * d * sum(a) with zero points)."""
    m, k = x.shape
    xb = x.float().view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    a = torch.round(xb * inv)
    d = (amax / 127.0).double()
    from edge_dlm.model.quant import unpack_int4

    signed = mod.zeros is None
    q = (unpack_int4(mod.qweight, signed=signed) if mod.spec.bits == 4 else mod.qweight).double()
    q = q.view(-1, k // 32, 32)
    per_block = torch.einsum("mbk,nbk->mnb", a.double(), q)  # exact integers
    group = torch.arange(k // 32) * 32 // mod.spec.group_size
    s = mod.scales.double()[:, group]  # [N, blocks]
    y = (per_block * s[None] * d[..., 0][:, None, :]).sum(-1)
    if not signed:
        z = mod.zeros.double()[:, group]
        y = y + (z[None] * (d[..., 0] * a.double().sum(-1))[:, None, :]).sum(-1)
    return y


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("out_f,in_f,group", SHAPES)
def test_narrow_passes_compute_what_they_document_and_rows_do_not_depend_on_the_width(scheme, symmetric, out_f,
                                                                                      in_f, group):
    mod = layer(scheme, out_f, in_f, group, symmetric=symmetric)
    x = torch.randn(cpu_matmul.MAX_ROWS, in_f, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([cpu_matmul.cpu_quant_matmul(x[i:i + 1], mod) for i in range(len(x))])
    want = documented(x, mod)
    assert (alone.double() - want).abs().max() <= 2e-5 * want.abs().max()  # float32 sums, other order
    assert rel(alone, linear_ref(x, mod)) < 1e-2  # the activations' int8 rounding: ~0.5% relative
    for m in (2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32):  # every blocking of rows: bit for bit the 1-row results
        assert torch.equal(cpu_matmul.cpu_quant_matmul(x[:m], mod), alone[:m]), m


def test_a_large_weight_on_huge_pages_computes_the_same():
    """Layouts of 8 MiB and more are allocated 2 MiB-aligned (huge pages where Linux offers them)."""
    mod = layer("int8", 4096, 2048, 32)
    w, _, _ = cpu_matmul.x16_layout(mod)
    assert w.numel() == 4096 * 2048 and (w.data_ptr() % (2 << 20) == 0 or __import__("platform").system() != "Linux")
    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(5))
    got, want = cpu_matmul.cpu_quant_matmul(x, mod), documented(x, mod)
    assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()


def reference_layout(mod: QuantLinear) -> torch.Tensor:
    """The 16-row layout as the C source describes it, in torch: per block of 16 rows and 4 columns (int4:
    8, two per byte: columns j and 4 + j), the rows' unsigned values side by side."""
    from edge_dlm.model.quant import unpack_int4

    bits, n, k = mod.spec.bits, mod.out_features, mod.in_features
    signed = mod.zeros is None
    q = (unpack_int4(mod.qweight, signed=signed) if bits == 4 else mod.qweight).to(torch.int16)
    q = q + (128 if bits == 8 else 8) if signed else q
    blocks = -(-n // 16)
    u = torch.zeros(blocks * 16, k, dtype=torch.int16)
    u[:n] = q
    if bits == 8:
        return u.view(blocks, 16, k // 4, 4).permute(0, 2, 1, 3).to(torch.uint8)
    v = u.view(blocks, 16, k // 8, 2, 4)
    return (v[..., 0, :] | (v[..., 1, :] << 4)).permute(0, 2, 1, 3).to(torch.uint8)


@pytest.mark.parametrize("scheme,symmetric", [("int8", True), ("int8", False), ("int4", True), ("int4", False)])
def test_the_layout_stands_in_for_the_stored_weight(scheme, symmetric):
    """After its first pass a layer holds its weight once, in the kernel's layout: the stored tensors
    come back from it exactly (attributes, state_dict, a move), and a pass of any width (QuadraticSpec's
    B(B+1) rows included) gives each row the bits it gets alone."""
    from edge_dlm.model.quant import weight_bytes

    mod = layer(scheme, 600, 256, 32, symmetric=symmetric)
    stored = {k: getattr(mod, k) for k in ("qweight", "scales", "zeros")}
    assert torch.equal(cpu_matmul.x16_layout(mod)[0], reference_layout(mod))
    before = weight_bytes(mod)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(2))
    wide = cpu_matmul.cpu_quant_matmul(x, mod)
    assert all(mod._buffers[k] is None for k in stored)  # dropped: the layout holds the weight
    assert weight_bytes(mod) <= 1.1 * before  # the layout pads rows to 16 (600 -> 608)
    for k, v in stored.items():
        got = getattr(mod, k)
        assert got is None if v is None else (got.dtype == v.dtype and torch.equal(got, v))
    assert set(mod.state_dict()) == {k for k, v in stored.items() if v is not None}
    assert all(torch.equal(v, stored[k]) for k, v in mod.state_dict().items())
    for m in (1, 2, 7):
        assert torch.equal(cpu_matmul.cpu_quant_matmul(x[:m], mod), wide[:m])
    assert rel(wide, linear_ref(x, mod)) < 1e-2
    mod.to("cpu", torch.float32)  # a move puts the stored tensors back (the scales become float32)
    assert mod._buffers["qweight"] is not None and not mod._derived
    assert torch.equal(mod.qweight, stored["qweight"])


def test_a_weight_read_in_place_from_its_file_is_handed_back_intact(tmp_path):
    """Tensors of a safetensors artifact live in the mapped file: once the layout stands in, their pages
    are handed back to the kernel, which changes nothing anyone reads (neighbours in the file, the
    stored tensors rebuilt, the outputs)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    mod = layer("int4", 512, 1024, 32)
    norm = torch.randn(1024)
    save_file({"a.norm": norm, "a.qweight": mod.qweight, "a.scales": mod.scales}, str(tmp_path / "m.safetensors"))
    with safe_open(tmp_path / "m.safetensors", framework="pt") as st:
        t = {k: st.get_tensor(k) for k in st.keys()}
    assert not t["a.qweight"].untyped_storage().resizable()  # read in place: the file's pages
    mapped = QuantLinear(1024, 512, mod.spec, {"qweight": t["a.qweight"], "scales": t["a.scales"]})
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(6))
    y = cpu_matmul.cpu_quant_matmul(x, mapped)
    assert mapped._buffers["qweight"] is None
    assert torch.equal(t["a.norm"], norm) and torch.equal(t["a.qweight"], mod.qweight)
    assert torch.equal(mapped.qweight, mod.qweight) and torch.equal(y, cpu_matmul.cpu_quant_matmul(x, mod))


def test_a_layout_that_cannot_give_the_weight_back_leaves_it_stored(monkeypatch):
    mod = layer("int8", 48, 256, 32)
    real = cpu_matmul.x16_stored
    monkeypatch.setattr(cpu_matmul, "x16_stored", lambda *a: {**real(*a), "qweight": real(*a)["qweight"] + 1})
    cpu_matmul.cpu_quant_matmul(torch.randn(2, 256), mod)
    assert mod._buffers["qweight"] is not None and mod._stored_from is None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_is_never_rounded_away(scheme, bad):
    """int8 rounding must not turn a NaN / inf into a number: the pass's all-finite check relies on it."""
    mod = layer(scheme, 48, 256, 32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    x[1, 77] = bad
    y = cpu_matmul.cpu_quant_matmul(x, mod)
    assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2]]).all()
    assert torch.equal(y[[0, 2]], cpu_matmul.cpu_quant_matmul(x[[0, 2]], mod))


def test_declines_what_it_does_not_cover():
    permuted = layer("int8", 32, 96, 32)
    permuted.perm = torch.randperm(96)
    assert cpu_matmul.cpu_quant_matmul(torch.randn(2, 96), permuted) is None  # act-order columns: the reference
    cpu_matmul.QUANT.prepare(permuted)  # no layout for it: the reference reads the stored weight
    assert not permuted._derived and permuted._buffers["qweight"] is not None


def test_a_compiled_pass_keeps_them_whole():
    from torch._dynamo.utils import counters

    m8, m4 = layer("int8", 64, 192, 32), layer("int4", 64, 192, 32)
    (w8, s8, _), (w4, s4, _) = cpu_matmul.x16_layout(m8), cpu_matmul.x16_layout(m4)

    def f(x):
        a = cpu_matmul.x16_gemm(x, w8, s8, None, 8, 32, 64)
        b = cpu_matmul.x16_gemm(x, w4, s4, None, 4, 32, 64)
        return torch.relu(a + b) * 2

    x = torch.randn(3, 192)
    counters.clear()
    fast = torch.compile(f, fullgraph=True, dynamic=False)
    assert torch.equal(fast(x), f(x))
    assert not counters["graph_break"]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_the_cpp_operators_are_the_ctypes_calls():
    """Where a C++ compiler is present the operators are C++ (built against torch's headers) and give
    exactly what the ctypes implementations give, with and without zero points, for every width."""
    cpu_build.library()
    assert cpu_build.cpp_operators(), "the C++ operators were not built"
    for scheme, symmetric in (("int8", True), ("int4", True), ("int4", False), ("int8", False)):
        mod = layer(scheme, 40, 192, 32, seed=3, symmetric=symmetric)
        lay = cpu_matmul.x16_layout(mod)
        for rows in (1, 3, 16, 37):
            x = torch.randn(rows, 192)
            args = (*lay, mod.spec.bits, 32, 40)
            assert torch.equal(cpu_matmul.x16_gemm(x, *args), cpu_ctypes.x16_gemm(x, *args)), (scheme, rows)
            assert torch.equal(cpu_matmul.x16_gemm(x.t().contiguous().t(), *args), cpu_ctypes.x16_gemm(x, *args))
    if cpu_build.simd()["bf16"]:
        w = torch.randn(45, 224).bfloat16()
        for rows in (1, 5, 32):
            x = torch.randn(rows, 224).bfloat16()
            y = cpu_matmul.bf16_gemm(x, w)
            assert torch.equal(y, cpu_ctypes.bf16_gemm(x, w)), rows
            # rounded in the call as torch's `.to` rounds (what a bf16 linear returns); [..., M, K] inputs
            for impl in (cpu_matmul.bf16_gemm, cpu_ctypes.bf16_gemm):
                out = impl(x[None], w, True)
                assert out.dtype == torch.bfloat16 and out.shape == (1, rows, 45)
                assert torch.equal(out[0].view(torch.int16), y.to(torch.bfloat16).view(torch.int16)), rows
    with pytest.raises(RuntimeError, match="float32"):
        cpu_matmul.x16_gemm(torch.randn(2, 192).double(), *lay, mod.spec.bits, 32, 40)


def test_the_kernels_run_on_torchs_threads():
    """No thread pool beside torch's: the kernels link no OpenMP runtime, their ranges run through ATen's
    parallel_for (no thread is added to torch's own, none outlives a call), and one thread or two give the
    same numbers."""
    lib = cpu_build.library()
    for so in [*cpu_build.LIB.glob("cpu_kernels-*.so"), Path(lib._name)]:
        data = so.read_bytes()
        assert not any(s in data for s in (b"libgomp", b"libomp", b"GOMP_parallel")), so
    if cpu_build.cpp_operators() and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert cpu_build.threads() == "torch's threads"
    mod = layer("int8", 512, 1024, 32, seed=5)
    lay = cpu_matmul.x16_layout(mod)
    x = torch.randn(64, 1024)
    w = torch.randn(300, 1024).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.randn(512, 512) @ torch.randn(512, 512)  # torch's pool started
        tasks = len(os.listdir("/proc/self/task"))
        two = cpu_matmul.x16_gemm(x, *lay, 8, 32, 512)
        two_bf16 = cpu_matmul.bf16_gemm(x.bfloat16(), w) if cpu_build.simd()["bf16"] else None
        assert len(os.listdir("/proc/self/task")) == tasks
        torch.set_num_threads(1)
        assert torch.equal(cpu_matmul.x16_gemm(x, *lay, 8, 32, 512), two)
        if two_bf16 is not None:
            assert torch.equal(cpu_matmul.bf16_gemm(x.bfloat16(), w), two_bf16)
    finally:
        torch.set_num_threads(threads)


# what each variant built with the package runs at: (x16, bf16) vector widths
WIDTHS = {"x86_64": {"avx512-bf16": (512, 512), "avx512": (512, 512), "avx-vnni": (256, 256), "avx2": (256, 256),
                     "generic": (0, 0)},
          "aarch64": {"i8mm": (128, 128), "dotprod": (128, 128), "generic": (0, 128)}}


@pytest.mark.parametrize("variant", [v["name"] for v in cpu_build.VARIANTS.get(cpu_build.arch(), [])])
def test_other_builds_agree(variant):
    """The variants built with the package (setup.py: one per instruction set) compute what this process's
    kernels do: the 256-bit paths (Intel laptops without AVX-512, AMD before Zen 4) and the portable C
    loops the same int8 / int4 sums bit for bit, the AVX-512 build of CPUs without its bf16 dot product
    (Ice Lake, Skylake-X) and the 256-bit one bf16 widened to float32, rows independent of the pass width
    in each; x86's portable build has no bf16 kernel (torch's serves). A variant that did not build fails."""
    v = next(v for v in cpu_build.VARIANTS[cpu_build.arch()] if v["name"] == variant)
    assert v in cpu_build.installed(), f"the {variant} variant was not built with the package ({cpu_build.LIB})"
    if missing := set(v["cpu"]) - cpu_build.cpu_features():
        pytest.skip(f"this CPU cannot run the {variant} build (no {', '.join(sorted(missing))})")
    lib = cpu_build.load(cpu_build.LIB / f"cpu_kernels-{variant}.so")
    x16_simd, bf16_simd = WIDTHS[cpu_build.arch()][variant]
    assert (lib.x16_simd(), lib.bf16_simd()) == (x16_simd, bf16_simd)
    for scheme in ("int8", "int4"):
        for symmetric in (True, False):
            mod = layer(scheme, 40, 192, 32, symmetric=symmetric)
            mod.qweight[:3] = -128 if scheme == "int8" and symmetric else mod.qweight[:3]  # the extreme byte
            w, s, z = cpu_matmul.x16_layout(mod)
            for rows in (1, 5, 9):
                x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(3))
                y = torch.empty(rows, 40)
                zp = ctypes.c_void_p(z.data_ptr()) if z is not None else None
                lib.x16_gemm(mod.spec.bits, x.data_ptr(), rows, 192, w.data_ptr(), s.data_ptr(), zp, 40, 32,
                             y.data_ptr(), 1)
                assert torch.equal(y, cpu_matmul.cpu_quant_matmul(x, mod))
    if not bf16_simd:
        assert not hasattr(lib, "bf16_gemm")
        return
    g = torch.Generator().manual_seed(4)
    for k in (224, 2080):  # one run over K, and chunks of it (wide passes: 1024 columns, then 32)
        w = (0.05 * torch.randn(45, k, generator=g)).to(torch.bfloat16)
        x = torch.randn(9, k, generator=g).to(torch.bfloat16)
        alone = torch.empty(9, 45)
        for i in range(9):  # row by row, then all 9 at once: the same bits
            lib.bf16_gemm(x[i:].data_ptr(), 1, k, w.data_ptr(), 45, alone[i:].data_ptr(), 1)
        here = cpu_matmul.bf16_gemm(x, w) if cpu_build.simd()["bf16"] else x.float() @ w.float().t()
        torch.testing.assert_close(alone, here, atol=1e-3, rtol=1e-4)
        y = torch.empty(9, 45)
        lib.bf16_gemm(x.data_ptr(), 9, k, w.data_ptr(), 45, y.data_ptr(), 1)
        assert torch.equal(y, alone), k


def test_a_build_without_a_bf16_vector_path_leaves_bf16_to_torch(monkeypatch):
    class Portable:
        @staticmethod
        def bf16_simd():
            return 0

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16))
    monkeypatch.setattr(cpu_matmul, "library", lambda: Portable)
    assert cpu_matmul.enable_bf16(model) == 0 and type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_lossless_modes_emit_ar_tokens_on_a_quantized_model(quant):
    from edge_dlm.runtime import load

    rt = load(device="cpu", quant=quant, group_size=32, compile="off")
    layers = [m for m in rt.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kernel is cpu_matmul.QUANT for m in layers)  # the CPU backend's, each layer
    kw = dict(max_new_tokens=64, block_size=4)
    ar = rt.generate("Write a story about a cat", mode="ar", **kw).output_ids
    for mode in ("linear-spec", "quadratic-spec"):  # B = 4: every pass of these modes is <= 32 rows
        assert rt.generate("Write a story about a cat", mode=mode, **kw).output_ids == ar, mode


@pytest.mark.parametrize("n", [48, 45])  # whole blocks of 12 / 6 weight rows (AVX-512's), and tails
# passes past 4 rows walk K in chunks of 1024 columns; 1-2 row passes over rows of up to 8192 columns read
# the weight a row at a time with AVX512-BF16 (`ONE_STREAM_K`), longer ones in blocks of rows
@pytest.mark.parametrize("k", [224, 2080, 8224])
def test_bf16_matches_and_rows_do_not_depend_on_the_width(n, k):
    needs_bf16()
    w = (0.05 * torch.randn(n, k, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    x = torch.randn(cpu_matmul.MAX_ROWS, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([cpu_matmul.bf16_gemm(x[i:i + 1], w) for i in range(len(x))])
    torch.testing.assert_close(alone, x.float() @ w.float().t(), atol=1e-3, rtol=1e-4)
    for m in (2, 3, 4, 5, 9, 32):
        assert torch.equal(cpu_matmul.bf16_gemm(x[:m], w), alone[:m]), m


def test_wide_bf16_passes_leave_the_kernel_only_for_avx512_bf16(monkeypatch):
    class Build:
        width = 256

        @classmethod
        def bf16_simd(cls):
            return cls.width

    monkeypatch.setattr(cpu_matmul, "library", lambda: Build)
    try:
        cpu_matmul.max_rows.cache_clear()
        assert cpu_matmul.max_rows() > 1 << 20  # torch's AVX2 bf16 GEMM: slower at every width
        Build.width = 512
        cpu_matmul.max_rows.cache_clear()
        assert cpu_matmul.max_rows() == cpu_matmul.MAX_ROWS
    finally:
        cpu_matmul.max_rows.cache_clear()


def test_bf16_models_route_narrow_passes_and_stay_lossless():
    needs_bf16()
    from edge_dlm.runtime import load

    rt = load(device="cpu", dtype="bfloat16", compile="off")
    lin = rt.model.encoder.layers[0].mlp.up_proj
    assert isinstance(lin, cpu_matmul.Bf16Linear)
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), (x.float() @ lin.weight.float().t()), atol=2e-2, rtol=2e-2)
    wide = torch.randn(cpu_matmul.MAX_ROWS + 1, lin.in_features, dtype=torch.bfloat16)
    if cpu_matmul.max_rows() == cpu_matmul.MAX_ROWS:  # AVX512-BF16: torch's GEMM past MAX_ROWS
        assert torch.equal(lin(wide), torch.nn.functional.linear(wide, lin.weight))
    else:  # a 256-bit build keeps every width
        assert torch.equal(lin(wide)[:1], lin(wide[:1]))
    kw = dict(max_new_tokens=64, block_size=4)
    ar = rt.generate("Write a story about a cat", mode="ar", **kw).output_ids
    for mode in ("linear-spec", "quadratic-spec"):
        assert rt.generate("Write a story about a cat", mode=mode, **kw).output_ids == ar, mode


def test_narrow_attention_is_sdpa_row_by_row():
    """`attend`: the narrow passes' attention over a cache window, against SDPA with the pattern's
    mask (every pattern, grouped query heads, keys past length + T never read), each row alone (its
    result does not depend on the other rows, on the rows computed beside it or on the thread count), the
    ctypes path equal."""
    import torch.nn.functional as F

    from edge_dlm.primitives.attention import Attn

    cpu_build.library()  # builds the kernels and registers the operators
    g = torch.Generator().manual_seed(0)
    for attn, t, heads, group, d, length, window in [
        (Attn("causal"), 1, 2, 4, 64, 300, 512), (Attn("causal"), 7, 1, 3, 64, 20, 256),
        (Attn("block"), 4, 2, 2, 128, 0, 256), (Attn("quad_cycle", block=2), 6, 1, 2, 32, 33, 256)]:
        cache_k = torch.randn(3, heads, window + 64, d, generator=g)
        cache_v = torch.randn(3, heads, window + 64, d, generator=g)
        cache_k[1, :, length + t:] = float("nan")  # past the pass's own keys: never read
        k, v = cache_k[1, :, :window], cache_v[1, :, :window]
        q = torch.randn(heads, group * t, d, generator=g)
        n = torch.tensor(length)
        mask = attn.window_mask(n, t, window)
        got = cpu_matmul.attend(q, k, v, mask, n, d ** -0.5)
        visible = slice(0, length + t)
        want = F.scaled_dot_product_attention(q[None], k[None, :, visible], v[None, :, visible],
                                              attn_mask=mask.repeat(group, 1)[:, visible], scale=d ** -0.5)[0]
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
        assert torch.equal(cpu_ctypes.attend(q, k, v, mask, n, d ** -0.5), got)
        other = q.clone()
        other[:, 1:] = torch.randn(other[:, 1:].shape, generator=g)
        assert torch.equal(cpu_matmul.attend(other, k, v, mask, n, d ** -0.5)[:, 0], got[:, 0])
        # each row as a pass of its own (AVX-512 builds run a head's rows 4 at a time, the last ones alone)
        for r in range(group * t):
            alone = cpu_matmul.attend(q[:, r:r + 1].contiguous(), k, v, mask[r % t][None], torch.tensor(length + t - 1),
                                      d ** -0.5)
            assert torch.equal(alone[:, 0], got[:, r]), (attn, r)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2 if threads == 1 else 1)
            assert torch.equal(cpu_matmul.attend(q, k, v, mask, n, d ** -0.5), got)
        finally:
            torch.set_num_threads(threads)


def test_narrow_passes_attend_in_c_and_agree_with_sdpa(tiny_model):
    """A model on the CPU attends through `attend` in passes of up to `NARROW` tokens; its logits are
    SDPA's (the same model with the kernel off) in every pattern, and wider passes keep SDPA."""
    import copy

    from edge_dlm.model.nld import NARROW
    from edge_dlm.primitives.attention import Attn

    fast = copy.deepcopy(tiny_model)
    assert cpu_matmul.enable_attention(fast) and fast.narrow_attention is cpu_matmul.attend
    for t, kind in [(1, "causal"), (4, "block"), (9, "causal"), (NARROW + 1, "causal")]:
        torch.testing.assert_close(one_pass(fast, t, 30, Attn(kind)), one_pass(tiny_model, t, 30, Attn(kind)),
                                   atol=1e-4, rtol=1e-4)


def one_pass(model, t: int, length: int, attn) -> torch.Tensor:
    """The logits of one cached pass of `t` tokens after `length` cached ones."""
    cache = model.new_cache(256)
    cache._set_length(length)
    with torch.inference_mode():
        window = cache.begin(t)
        return model.step(torch.arange(5, 5 + t)[None] % 50 + 5, torch.arange(length, length + t)[None],
                          cache.length_t, cache.k, cache.v, attn, window, False, None)


@pytest.mark.parametrize("weights", ["bf16", "int4", "int8"])
def test_fused_projections_are_the_modules_alone(tiny_model, weights, tmp_path):
    """q / k / v and gate / up as one kernel call (`fuse`): the same logits bit for bit as each module
    alone, in narrow and wide passes, the same state dict, nothing held twice; a dtype move drops it."""
    import copy

    if weights == "bf16":
        needs_bf16()

    from edge_dlm.model.quant import QuantSpec
    from edge_dlm.model.quantize import quantize_model
    from edge_dlm.primitives.attention import Attn

    base = copy.deepcopy(tiny_model)
    if weights == "bf16":
        base = base.to(torch.bfloat16)
    else:
        quantize_model(base, QuantSpec(weights, group_size=32))
    cpu_matmul.route_quant(base)
    cpu_matmul.enable_bf16(base)
    fast = copy.deepcopy(base)
    assert cpu_matmul.fuse(fast) == 2 * len(fast.encoder.layers)
    at = fast.encoder.layers[0].self_attn
    # held once: the module's weight (bf16) or its kernel layout (int8 / int4) is a view of the fused one
    assert at.q_proj.weight.untyped_storage().data_ptr() == at.fused.weight.untyped_storage().data_ptr()
    for t in (1, 4, 40):
        assert torch.equal(one_pass(base, t, 9, Attn("block")), one_pass(fast, t, 9, Attn("block"))), t
    a, b = base.state_dict(), fast.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if weights == "bf16":  # weights that are views of one tensor save as they are
        from edge_dlm.model.weights import read_tensors, save_checkpoint, weight_files

        save_checkpoint(fast, fast.config, tmp_path)
        saved = read_tensors(weight_files(tmp_path), list(a))
        assert all(torch.equal(saved[k], a[k]) for k in a)
    fast.float()
    assert at.fused is None and fast.encoder.layers[0].mlp.fused is None


def test_a_damaged_library_is_set_aside_and_rebuilt(tmp_path, capfd):
    """A kernel library cut short or overwritten with junk is never loaded (a cut one would end the
    process with SIGBUS): it is moved aside with one line and rebuilt; a failed build raises the
    compiler's message; a folder that cannot be written builds into a temporary one."""
    if cpu_build.available():
        pytest.skip("no C compiler (cc) on this machine: nothing to build")
    out = tmp_path / "k.so"

    def compile_into(path):
        return cpu_build.compile_kernels(path)

    compile_into(out)  # not loaded here: a library this process maps must not be cut under it
    assert (tmp_path / "k.so.sha256").exists()
    good = out.read_bytes()
    for damage in (good[:len(good) // 3], b"junk" * 100, b""):
        out.write_bytes(damage)
        capfd.readouterr()
        assert compile_into(out) == out and cpu_build._intact(out) and len(out.read_bytes()) == len(good)
        err = capfd.readouterr().err
        assert err.count("set aside") == 1 and (tmp_path / "k.so.bad").exists()
    assert cpu_build.build(out).x16_simd() >= 0  # the rebuilt library loads
    with pytest.raises(cpu_build.BuildError, match="error"):
        cpu_build._compile({"bad.c": "this is not C"}, tmp_path / "bad.so",
                           lambda d, so: ["cc", "-shared", str(d / "bad.c"), "-o", so])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only folder is writable")
        path = cpu_build.compile_kernels(ro / "k.so")
        assert path.exists() and path.parent != ro and "cannot write the kernel cache" in capfd.readouterr().err
    finally:
        ro.chmod(0o700)


def test_the_kernels_switch(monkeypatch, tiny_ckpt):
    """One switch: `--kernels off` / $EDGE_DLM_KERNELS=off load a CPU model without the C kernels
    (the reference serves, the same tokens for a float32 model); a bad value is a one-line error."""
    import edge_dlm
    from edge_dlm import kernels
    from edge_dlm.primitives.errors import UserError

    monkeypatch.setenv(kernels.ENV, "off")
    assert kernels.choice() == "off" and kernels.choice("on") == "on"
    off = edge_dlm.load(tiny_ckpt, device="cpu")
    assert off.model.narrow_attention is None
    monkeypatch.setenv(kernels.ENV, "sideways")
    with pytest.raises(UserError, match="EDGE_DLM_KERNELS"):
        kernels.choice()
    monkeypatch.delenv(kernels.ENV)
    if not cpu_build.available():
        on = edge_dlm.load(tiny_ckpt, device="cpu", kernels="on")
        assert on.model.narrow_attention is not None
        for mode in ("ar", "linear-spec"):
            assert on.generate("hello", mode=mode, max_new_tokens=12).output_ids == \
                off.generate("hello", mode=mode, max_new_tokens=12).output_ids


def test_a_broken_build_fails_the_suite():
    """Where a C compiler exists the kernels must build and load: a build failure is a failure here,
    with the compiler's message, never a skip elsewhere."""
    if cpu_build.available():
        pytest.skip(f"{cpu_build.available()[0]}: neither a built library nor a compiler")
    assert cpu_build.usable(), f"the CPU kernels did not build: {cpu_build.failure()}"
    assert cpu_build.failure() is None
    v, why = cpu_build.variant()
    if cpu_build.installed():  # an install (make test): a variant built with the package, no compile here
        assert v != "native", why
        assert cpu_build.cpp_operators() and "with the package" in cpu_build._BOUND.ops_origin


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(cpu_build.VARIANT_ENV)), reason="inside a forced-variant run already")
def test_every_variant_this_cpu_runs_passes_this_file():
    """$EDGE_DLM_CPU_VARIANT forces each variant built with the package that this CPU can run (other than
    the one this process picked, which the rest of the suite runs): this whole file passes under each."""
    import subprocess
    import sys

    have, picked = cpu_build.cpu_features(), cpu_build.variant()[0]
    others = [v["name"] for v in cpu_build.installed() if set(v["cpu"]) <= have and v["name"] != picked]
    if not others:
        pytest.skip("no other variant built with the package runs on this CPU")
    for name in others:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore",
                            "-m", "not slow", __file__], capture_output=True, text=True,
                           env={**os.environ, cpu_build.VARIANT_ENV: name})
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}{r.stderr[-2000:]}"


def test_a_forced_variant_this_cpu_cannot_run_is_one_line(monkeypatch):
    from edge_dlm.primitives.errors import UserError

    for value, match in (("sideways", "not a kernel variant"), ("native", None)):
        monkeypatch.setenv(cpu_build.VARIANT_ENV, value)
        if match is None:
            assert cpu_build.pick()[0] is None
        else:
            with pytest.raises(UserError, match=match):
                cpu_build.pick()
    foreign = {"x86_64": "dotprod", "aarch64": "avx2"}.get(cpu_build.arch(), "avx2")
    monkeypatch.setenv(cpu_build.VARIANT_ENV, foreign)
    with pytest.raises(UserError, match="not a kernel variant"):
        cpu_build.pick()
    monkeypatch.setattr(cpu_build, "cpu_features", lambda: frozenset())
    best = cpu_build.VARIANTS[cpu_build.arch()][0]
    monkeypatch.setenv(cpu_build.VARIANT_ENV, best["name"])
    with pytest.raises(UserError, match="this CPU lacks"):
        cpu_build.pick()
    monkeypatch.delenv(cpu_build.VARIANT_ENV)
    v, _ = cpu_build.pick()  # a CPU reporting nothing runs the generic build
    assert v is None or v["cpu"] == []


def test_arm_features_pick_their_variant():
    """An ARM CPU's features, as macOS' sysctl or Linux's /proc/cpuinfo names them, pick the variant
    made for it: the int8 matrix multiply and bf16 (Apple M2+, Graviton 3), the dot product alone (M1),
    neither (an old macOS whose sysctl knows none of the names prints nothing for them)."""
    def first(have):
        return next(v["name"] for v in cpu_build.VARIANTS["aarch64"] if set(v["cpu"]) <= have)

    m2 = "hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 1\nhw.optional.arm.FEAT_BF16: 1\n"
    m1 = "hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 0\nhw.optional.arm.FEAT_BF16: 0\n"
    assert cpu_build.darwin_features(m2) == {"asimddp", "i8mm", "bf16"}
    assert [first(cpu_build.darwin_features(t)) for t in (m2, m1, "")] == ["i8mm", "dotprod", "generic"]
    graviton3 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
                 "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp "
                 "svei8mm svebf16 i8mm bf16 dgh rng")
    pi5 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    assert [first(frozenset(t.split())) for t in (graviton3, pi5)] == ["i8mm", "dotprod"]


def test_builds_of_an_older_source_or_damaged_are_not_loaded(monkeypatch, tmp_path):
    """An installed library is loaded only when it was built from today's source (a source checkout
    edited since its install builds at first use) and matches its recorded checksum."""
    if not cpu_build.installed():
        pytest.skip("no variants built with the package here")
    monkeypatch.delenv(cpu_build.VARIANT_ENV, raising=False)
    lib = tmp_path / "lib"
    lib.mkdir()
    for f in cpu_build.LIB.iterdir():
        (lib / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(cpu_build, "LIB", lib)
    assert cpu_build.installed()
    (lib / "sources.json").write_text(json.dumps(dict.fromkeys([*cpu_build.SOURCES, "cpu_ops.cpp"], "0000")))
    assert cpu_build.installed() == [] and "today's source" in cpu_build.pick()[1]
    (lib / "sources.json").write_text("[1, 2]")  # junk of the wrong shape: the same
    assert cpu_build.installed() == []
    (lib / "sources.json").write_bytes((Path(cpu_build.__file__).parent / "lib" / "sources.json").read_bytes())
    v, _ = cpu_build.pick()
    path = lib / f"cpu_kernels-{v['name']}.so"
    assert cpu_build._verified(path)
    path.write_bytes(path.read_bytes()[:1000])  # cut short: never loaded (SIGBUS)
    assert not cpu_build._verified(path)


def test_the_operators_check_what_they_are_given():
    """Wrong shapes, dtypes, group sizes or layouts are one clear error from the operator, never a crash;
    the ctypes implementations check the same."""
    cpu_build.library()
    mod = layer("int8", 32, 64, 32)
    w, s, _ = cpu_matmul.x16_layout(mod)
    x = torch.randn(2, 64)
    bad = [
        ((x[:, :48].contiguous(), w, s, None, 8, 32, 32), "K must be a positive multiple of 32|16-row"),
        ((x, w, s, None, 8, 48, 32), "group size"),
        ((x, w, s, None, 5, 32, 32), "bits"),
        ((x, w, s, None, 8, 32, 64), "16-row uint8 layout"),
        ((x, w[:1], s, None, 8, 32, 32), "16-row uint8 layout"),
        ((x, w, s.float(), None, 8, 32, 32), "scales"),
        ((x, w, s, s[:1], 8, 32, 32), "zeros"),
    ]
    for impl in (cpu_matmul.x16_gemm, cpu_ctypes.x16_gemm):
        for args, match in bad:
            with pytest.raises(RuntimeError):
                impl(*args)
        for args, match in bad[1:4]:
            if impl is cpu_matmul.x16_gemm:
                with pytest.raises(RuntimeError, match=match):
                    impl(*args)
    if cpu_build.simd()["bf16"]:
        wb = torch.randn(8, 64).bfloat16()
        for impl in (cpu_matmul.bf16_gemm, cpu_ctypes.bf16_gemm):
            with pytest.raises(RuntimeError, match="K|bfloat16"):
                impl(torch.randn(2, 32).bfloat16(), wb)
            with pytest.raises(RuntimeError, match="bfloat16"):
                impl(torch.randn(2, 64), wb)


@pytest.mark.slow
def test_an_install_answers_without_a_compiler(tmp_path):
    """Installed (make test / pip install .), a process on a PATH with no C or C++ compiler and an empty
    cache runs the kernels built with the package: doctor names the variant, a quantized answer comes
    with nothing built (no kernel library in the cache)."""
    import subprocess
    import sys

    if not cpu_build.installed():
        pytest.skip("no variants built with the package here (a source checkout)")
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "bin"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop(cpu_build.VARIANT_ENV, None)
    cli = str(Path(sys.executable).parent / "edge-dlm")
    doctor = subprocess.run([cli, "doctor"], capture_output=True, text=True, env=env, timeout=300)
    line = next(ln for ln in doctor.stdout.splitlines() if "matmul kernels" in ln)
    assert f"the {cpu_build.variant()[0]} variant" in line and "C++ operators (built with the package)" in line, line
    r = subprocess.run([cli, "generate", "--prompt", "Hello", "--quant", "int4", "--max-new-tokens", "8", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "building" not in r.stderr, r.stderr[-1000:]
    assert not list((tmp_path / "cache").rglob("*.so"))
