"""CPU matmuls for the passes of a decode: int8 / int4 (`x16_gemm`, for `QuantLinear`) and bfloat16
(`bf16_gemm`, for `Bf16Linear`; projections that share an input as one call: `fuse`), the attention
of narrow passes (`attend`) and the small operations between them in eager passes (`enable_small_ops`):
the layers and weight layouts that use the C kernels (`csrc/*.c`,
output rows split over torch's threads), which `cpu_build` loads (the variant built with the package for this CPU)
and calls through torch operators written in C++, so a compiled pass (`--compile on`) keeps them in its
graph.

Why our own: torch has no group-wise int8 CPU kernel (the reference dequantized every weight on every
pass: 0.03x llama.cpp's Q8_0 decode at the NLD-3B shape), its int4 kernel's cost grows with every row
of a pass, and its bf16 matrix-vector product reads ~18 GB/s on a Zen 4 core where memory gives ~30-40.

    int8 / int4 (x16_gemm):  x rounded to int8 per block of 32 columns (d = max|x| / 127, as
        llama.cpp does for its Q8_0 / Q4_0 dot products), weights held in the kernel's layout built at
        load (`x16_layout`: 16 output rows side by side, 2 MiB pages), one AVX512-VNNI unsigned x signed
        dot product serving 16 rows at once; scales applied per block of 32 in float32;
    bf16 (bf16_gemm):  x . w in bf16 pairs (AVX512-BF16, ARM's bfdot) or widened, float32 sums;
    wide bf16 passes:  past `MAX_ROWS` rows on AVX512-BF16 and ARM, torch's bf16 GEMM (`max_rows`; int8 / int4
        passes of every width stay on `x16_gemm`).

Each output (m, n) is computed by the same operations whatever the pass width M and whichever rows
share a register tile, so a row's result never depends on how many rows the pass has (LinearSpec's
verify pass and AR's step agree bit for bit); output rows are split over threads, never a sum. CPUs
without AVX-512 (Intel laptops and desktops from Skylake to today's, AMD before Zen 4) build 256-bit
paths of the same arithmetic: AVX-VNNI's dot product where the CPU has it (Alder Lake and later), else
AVX2's byte-pair sums, exact (the int8 / int4 results are bit for bit the AVX-512 build's), and bf16
widened to float32 with fused multiply-adds. ARM CPUs with the dot product run int8 / int4 through
NEON's `sdot`, or `smmla` (2 x-rows by 2 weight rows an instruction) where the CPU has the int8 matrix
multiply (the same sums), others portable C loops; bf16 on every ARMv8 in NEON, with `bfdot` where the
CPU has it, else widened to float32, up to `MAX_ROWS` rows (`cpu_build.simd()` says which; `edge-dlm doctor` prints it;
`tests/kernels/test_cpu_matmul.py` checks each variant this CPU can run). Where none loads, or with
`--kernels off`, the references serve.

The int8 / int4 layout stands in for the stored `qweight` / `scales` / `zeros` (`QuantLinear.derived`
drops them once `x16_stored` rebuilds them exactly from it, and rebuilds them for whatever reads them
later: export, `state_dict`, the reference), so a quantized model holds its weights once.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import torch

from edge_dlm.kernels.cpu_build import (attend, bf16_gemm, cpp_operators, library, rms_norm, rope_attend,  # noqa: F401
                                        silu_mul, usable, x16_gemm)  # (the operators)


def _huge_pages(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer of `nbytes` backed by transparent huge pages where the kernel
    offers them (madvise before first touch): streaming the weights of a decode step from memory ran
    7-13% faster on 2 MiB pages than on 4 KiB ones (one TLB miss per 2 MiB, prefetchers not stopped
    at every 4 KiB)."""
    huge = 2 << 20
    if nbytes < 4 * huge or platform.system() != "Linux":  # small: not worth a 2 MiB alignment pad
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + huge, dtype=torch.uint8)
    start = (raw.data_ptr() + huge - 1) // huge * huge
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, nbytes // huge * huge, 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
    off = start - raw.data_ptr()
    return raw[off:off + nbytes]


def x16_layout(mod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`mod`'s weight in the narrow kernel's layout (`x16_pack` in the C source): rows in blocks of 16
    (the last padded with zeros), per 4 columns (int4: 8) the 16 rows' bytes side by side, as unsigned
    values (signed ones offset by 128 / 8: the kernel subtracts the offset times the activations' sum);
    scales and zero points `[blocks, groups, 16]` fp16. It stands in for `qweight` / `scales` /
    `zeros` (`x16_stored` gives them back). Converted in C at memory speed (in torch, the 3B shape's
    29 weights took 3.4 s of a first answer)."""
    bits, n, k = mod.spec.bits, mod.out_features, mod.in_features
    signed = mod.zeros is None
    blocks = -(-n // 16)
    weight = _huge_pages(blocks * 16 * k * bits // 8).view(blocks, k * bits // 32, 16, 4)
    stored = mod.qweight.contiguous()
    library().x16_pack(bits, int(signed), stored.data_ptr(), n, k, weight.data_ptr(), torch.get_num_threads())

    def rows16(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(blocks * 16, t.shape[1], dtype=torch.float16)
        out[:n] = t
        return out.view(blocks, 16, -1).permute(0, 2, 1).contiguous()
    return weight, rows16(mod.scales), None if signed else rows16(mod.zeros)


def x16_stored(layout, mod, blocks: slice = slice(None)) -> dict[str, torch.Tensor | None]:
    """The inverse of `x16_layout`: `mod`'s `qweight`, `scales` and `zeros` as stored (the rows of the
    16-row `blocks` only, when given)."""
    weight, s16, z16 = (t if t is None else t[blocks] for t in layout)
    bits, k = mod.spec.bits, mod.in_features
    n = min(mod.out_features - 16 * (blocks.start or 0), 16 * weight.shape[0])
    signed = z16 is None
    qweight = torch.empty(n, k * bits // 8, dtype=torch.int8 if signed and bits == 8 else torch.uint8)
    library().x16_unpack(bits, int(signed), weight.data_ptr(), n, k, qweight.data_ptr(), torch.get_num_threads())

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.permute(0, 2, 1).reshape(-1, t.shape[1])[:n].contiguous()
    return {"qweight": qweight, "scales": rows(s16), "zeros": rows(z16)}


MAX_ROWS = 32  # bf16 with AVX-512 and on ARM: wider passes (prefill chunks, QuadraticSpec's cycle) go to torch's GEMM


@functools.lru_cache(maxsize=1)
def max_rows() -> int:
    """The widest bf16 pass `Bf16Linear` takes: every width on a 256-bit x86 build (torch's AVX2 bf16 GEMM
    was 2.5-2.9x slower than this kernel at every width from 16 to 256 rows), else `MAX_ROWS`: torch's
    bf16 GEMM wins past ~32 rows with AVX512-BF16 (29.5 vs 40.8 ms at 256 x 3072 x 9216), and on ARM
    (NEON) wide passes keep torch's GEMM (the ARM compute library's), as nothing here measured them."""
    return 1 << 62 if library().bf16_simd() == 256 else MAX_ROWS


class Bf16Linear(torch.nn.Linear):
    """`nn.Linear` with bf16 weights on the CPU: passes up to `max_rows()` rows (set at `enable_bf16`,
    outside any compiled trace) through `bf16_gemm`
    (AVX512-BF16 dot products; torch's bf16 matrix-vector product reads ~18 GB/s on a Zen 4 core),
    wider ones through torch's GEMM. A row's result never depends on the width within either route."""

    max_rows = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None or x.numel() > self.max_rows * x.shape[-1] or self.in_features % 32 or \
                x.dtype != torch.bfloat16 or x.dim() < 2:
            return super().forward(x)
        return bf16_gemm(x, self.weight, True)  # rounded to bf16 in the call


def enable_bf16(model: torch.nn.Module) -> int:
    """Rebuild `model`'s bf16 CPU linears as `Bf16Linear`s (the same weights); returns how many (0 without a
    compiler or without a vector path: a scalar loop would be slower than torch's own bf16 kernels)."""
    from edge_dlm.model.layers import replace_linears

    if not usable() or not library().bf16_simd():
        return 0
    shared = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    layers = replace_linears(model, lambda m: m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu",
                             Bf16Linear)
    for mod in layers:
        mod.max_rows = max_rows()
        if shared[id(mod.weight)] == 1:  # onto 2 MiB pages (a tied weight stays where it is)
            w = _huge_pages(mod.weight.numel() * 2).view(torch.bfloat16).view(mod.weight.shape)
            w.copy_(mod.weight.detach())
            mod.weight = torch.nn.Parameter(w, requires_grad=mod.weight.requires_grad)
    return len(layers)




def cpu_quant_matmul(x: torch.Tensor, mod) -> torch.Tensor | None:
    """The CPU matmul of an int8 / int4 `QuantLinear` in the edge-dlm layout (`QUANT`): every pass
    through `x16_gemm`, whatever its width (it beat dequantizing to bf16 for torch's GEMM at every width
    measured, up to 512 rows: `scripts/bench_cpu_matmul.py`), so a row's result is the same in every
    pass, QuadraticSpec's widest included."""
    if not _covers(mod):
        return None
    x2 = x.reshape(-1, mod.in_features)
    w, s, z = _layout(mod)
    y = x16_gemm(x2.float(), w, s, z, mod.spec.bits, mod.spec.group_size, mod.out_features)
    return y.to(x.dtype).reshape(*x.shape[:-1], mod.out_features)


def _covers(mod) -> bool:  # act-order columns, odd widths and groups below a block: the reference's
    return mod.perm is None and mod.in_features % 32 == 0 and mod.spec.group_size >= 32


LAYOUT = "cpu-x16"  # the name `QuantLinear.derived` keeps this kernel's layout under


def _layout(mod):
    return mod.derived(LAYOUT, x16_layout, x16_stored)


class QuantKernel:
    """`cpu_quant_matmul` as a `QuantLinear.kernel` (the CPU backend gives it to each int8 / int4 layer),
    with `prepare`: the layer's 16-row layout built ahead (before a compile traces the matmul)."""

    device_type = "cpu"

    def __call__(self, x: torch.Tensor, mod) -> torch.Tensor | None:
        return cpu_quant_matmul(x, mod)

    def prepare(self, mod) -> None:
        if _covers(mod):
            _layout(mod)

    def __deepcopy__(self, memo) -> "QuantKernel":  # one kernel, whatever copies the model
        return self


QUANT = QuantKernel()


def build(model: torch.nn.Module) -> bool:
    """A model's layers rebuilt for these kernels (the CPU backend's part, `edge_dlm.kernels.backend`): its
    narrow passes' attention (`enable_attention`), its int8 / int4 layers' matmuls (`QUANT`), its bf16
    linears (`Bf16Linear`), the projections that share an input fused (`fuse`), the kernel layouts built.
    False where nothing is routed (no kernels here)."""
    from edge_dlm.model.quant import prepare_layouts

    attention = enable_attention(model)
    if not usable():
        return attention
    small = enable_small_ops(model)
    quant = route_quant(model)
    bf16 = enable_bf16(model)
    if not (quant or bf16):
        return attention or small
    fuse(model)
    prepare_layouts(model)  # now: a first answer never waits for them
    return True


def route_quant(model: torch.nn.Module) -> int:
    """Give `model`'s int8 / int4 layers this matmul (`QUANT`); returns how many."""
    from edge_dlm.model.quant import set_kernels

    return set_kernels(model, QUANT)


class Fused:
    """Linears that read one input (q / k / v; gate / up) as one kernel call on their weights laid side
    by side: the input is read (and for int8 / int4 rounded to int8) once, and a demo-model token makes
    17 calls instead of 29 (each ~2 us of dispatch). The modules' own weights are views of the fused one
    (bf16) or their kernel layouts are (int8 / int4), so nothing is held twice; each output is computed
    as the module alone computes it. Built by `fuse`; a device or dtype move or a load drops it."""

    def __init__(self, splits: list[int], in_features: int, weight: torch.Tensor, scales=None, zeros=None,
                 bits: int = 0, group: int = 0, max_rows: int = 0) -> None:
        self.splits, self.in_features, self.n = splits, in_features, sum(splits)
        self.weight, self.scales, self.zeros, self.bits, self.group, self.max_rows = \
            weight, scales, zeros, bits, group, max_rows

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x2 = x.reshape(-1, self.in_features)
        if self.bits:
            y = x16_gemm(x2.float(), self.weight, self.scales, self.zeros, self.bits, self.group, self.n).to(x.dtype)
        elif x2.shape[0] <= self.max_rows and x.dtype == torch.bfloat16:
            y = bf16_gemm(x2, self.weight, True)
        else:  # wide bf16 passes: torch's GEMM, as `Bf16Linear`
            y = torch.nn.functional.linear(x2, self.weight)
        return y.reshape(*x.shape[:-1], self.n).split(self.splits, -1)


def fuse(model: torch.nn.Module) -> int:
    """Run each layer's q / k / v and gate / up projections as one `Fused` call where they share a
    format the kernels take (bf16 through `Bf16Linear`, or int8 / int4 in the 16-row layout, output
    widths multiples of 16); returns how many groups."""
    n = 0
    for layer in getattr(getattr(model, "encoder", None), "layers", ()):
        at, mlp = layer.self_attn, layer.mlp
        at.fused = _fused([at.q_proj, at.k_proj, at.v_proj])
        mlp.fused = _fused([mlp.gate_proj, mlp.up_proj])
        n += (at.fused is not None) + (mlp.fused is not None)
    return n


def _fused(mods: list) -> Fused | None:
    from edge_dlm.model.quant import QuantLinear

    k, splits = mods[0].in_features, [m.out_features for m in mods]
    if any(m.in_features != k for m in mods):
        return None
    if all(type(m) is Bf16Linear and m.bias is None for m in mods) and k % 32 == 0:
        w = _huge_pages(sum(splits) * k * 2).view(torch.bfloat16).view(sum(splits), k)
        row = 0
        for m in mods:
            w[row:row + m.out_features].copy_(m.weight.detach())
            m.weight = torch.nn.Parameter(w[row:row + m.out_features], requires_grad=m.weight.requires_grad)
            row += m.out_features
        return Fused(splits, k, w, max_rows=mods[0].max_rows)
    if not all(isinstance(m, QuantLinear) and _covers(m) and m.out_features % 16 == 0 and m.spec == mods[0].spec
               for m in mods):
        return None
    lays = [_layout(m) for m in mods]
    if any((lay[2] is None) != (lays[0][2] is None) for lay in lays):
        return None
    first = lays[0][0]
    weight = _huge_pages(sum(lay[0].numel() for lay in lays)).view(-1, *first.shape[1:])
    torch.cat([lay[0] for lay in lays], out=weight)
    scales = torch.cat([lay[1] for lay in lays])
    zeros = None if lays[0][2] is None else torch.cat([lay[2] for lay in lays])
    block = 0
    for m, lay in zip(mods, lays):
        b = slice(block, block + lay[0].shape[0])
        m.rebind(LAYOUT, (weight[b], scales[b], None if zeros is None else zeros[b]))
        block = b.stop
    return Fused(splits, k, weight, scales, zeros, mods[0].spec.bits, mods[0].spec.group_size)


def enable_small_ops(model: torch.nn.Module) -> bool:
    """The small operations between a layer's matmuls as one C call each in eager passes (a compiled pass fuses
    them itself): RMSNorm (`rms_norm`; bf16 models), SiLU(gate) x up (`silu_mul`) and, for narrow passes, the rotary
    embedding, the K / V cache writes and the attention (`rope_attend`). They stand for ~40 torch operations
    a layer, each a few microseconds of dispatch: a decode step of NLD-3B's 26 layers in bf16 on one Zen 5
    thread, 270.4 -> 261.5 ms; the demo model's in float32, 1.60 -> 1.12 ms (the same process, interleaved:
    `scripts/profile_decode.py --small-ops-ab`). Where the C++ operators are built (through ctypes a call would
    cost about what it saves) and the model's activations are bfloat16 or float32; returns whether they are on."""
    from edge_dlm.model.nld import MLP, RMSNorm

    norm = getattr(getattr(model, "encoder", None), "norm", None)
    if norm is None or not cpp_operators() or norm.weight.dtype not in (torch.bfloat16, torch.float32):
        return False
    for mod in model.modules():
        # RMSNorm in bf16 only: float32's last bit depends on the order the squares are summed, and torch's is
        # its own; the demo model in float32 with int8 weights (activations rounded to int8 right after the
        # norm, so a last bit moves a rounding) parted from torch's norm's 64 greedy tokens on 7 of 10 prompts
        # (scripts/eval_gguf_agreement.py's), where in bf16, int8 or not, all 10 agree (bf16's rounding hides it)
        if isinstance(mod, RMSNorm) and mod.weight.dtype == torch.bfloat16:
            mod.kernel = rms_norm
        elif isinstance(mod, MLP):
            mod.act = silu_mul
    if getattr(model, "narrow_attention", None) is not None:
        model.rope_attention = rope_attend
    return True


def enable_attention(model: torch.nn.Module) -> bool:
    """Cached passes of up to `nld.NARROW` tokens attend through `attend` (a model whose head size is a
    multiple of 16). On the demo model, one thread, an AR step's attention (3 query rows, 300 cached
    tokens, a 512-slot window) costs ~6 us a layer this way against ~21 us through SDPA's flash kernel,
    and each row is computed alone, so a row's result never depends on the pass width."""
    if not hasattr(model, "narrow_attention") or model.config.head_dim % 16 or not usable():
        return False
    model.narrow_attention = attend
    return True
