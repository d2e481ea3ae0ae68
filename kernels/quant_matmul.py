"""Weight-only int4 / int8 matmuls that read the packed weights once: `y = x @ dequant(W)^T`.

The weights stay in edge-dlm's own layout (`edge_dlm.model.quant`): `qweight` `[N, K]` int8 or `[N, K / 2]`
uint8 (two columns per byte, the even column in the low nibble), `scales` `[N, K / group]` fp16 and,
asymmetric, `zeros` (the group minimum, fp16): w = q * s (+ zero). No repacking, no second copy.

One kernel serves every row count the decoding modes use (M = 1 for AR, B = 16/32 for drafts,
verification and denoising, B(B+1) for QuadraticSpec, prefill chunks): program (m, n, split) loads an
`[BLOCK_N, BLOCK_K]` tile of packed weights, unpacks and scales it in registers (one group per tile:
BLOCK_K divides the group size) and accumulates `tl.dot(x_tile, w_tile^T)` in fp32. Decoding is
bound by reading the weights, so rows are cheap: M = 1 runs in a 16-row tile like M = 16 does. With
few output tiles (small N, few rows) the K range is split over `split` programs that write fp32
partials, summed by one `torch.sum` (deterministic, no atomics), so the GPU's SMs all stream weights.
No autotuning: the launch parameters are a function of (M, N, K), so a pass captured in a CUDA graph
replays exactly what eager ran.

Under `TRITON_INTERPRET=1` (CPU CI) the dot runs in fp32: the interpreter computes bf16 `tl.dot` wrongly.
`quant_matmul_ref` is the reference: dequantize the whole weight, `F.linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edge_dlm.kernels.attention import interpreting
from edge_dlm.model.quant import QuantLinear, linear_ref

SM_TARGET = 264  # programs to aim for: two waves of an H100's 132 SMs


@triton.jit
def wq_matmul_kernel(X, W, S, Z, Y, M, N, K, sx_m, sw_n, ss_n, sy_s, sy_m, k_per_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_F32: tl.constexpr):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * sx_m + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        if BITS == 4:  # a byte holds columns 2j (low nibble) and 2j + 1 (high nibble)
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(W + offs_n[:, None] * sw_n + offs_b[None, :], mask=n_ok[:, None], other=0)
            b = b.to(tl.int32)
            lo, hi = b & 0xF, (b >> 4) & 0xF
            if not HAS_ZERO:  # signed nibbles: [0, 15] -> [-8, 7]
                lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
            q = tl.interleave(lo, hi)
        else:
            q = tl.load(W + offs_n[:, None] * sw_n + offs_k[None, :], mask=n_ok[:, None], other=0)
        g = k0 // GROUP
        s = tl.load(S + offs_n * ss_n + g, mask=n_ok, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[:, None]
        if HAS_ZERO:
            z = tl.load(Z + offs_n * ss_n + g, mask=n_ok, other=0.0).to(tl.float32)
            w += z[:, None]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(Y + split * sy_s + offs_m[:, None] * sy_m + offs_n[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


def launch_config(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits) for an `[m, k] x [n, k]^T` product."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    block_k = min(group, 64 if m <= 64 else 32)
    if interpreting():
        return block_m, 32, min(group, 32), 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits = 1
    while tiles * splits * 2 <= SM_TARGET and k // (splits * 2) >= 4 * block_k and k % (splits * 2 * block_k) == 0:
        splits *= 2
    return block_m, block_n, block_k, splits


def quant_matmul(x: torch.Tensor, mod: QuantLinear) -> torch.Tensor:
    """`x [..., K] @ dequant(mod)^T -> [..., N]` in x's dtype (int8 or int4, group-wise, edge-dlm layout)."""
    k, n = mod.in_features, mod.out_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    group = mod.spec.group_size
    block_m, block_n, block_k, splits = launch_config(m, n, k, group)
    part = torch.empty((splits, m, n), device=x.device, dtype=torch.float32)
    zeros = mod.zeros if mod.zeros is not None else mod.scales
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    wq_matmul_kernel[grid](x2, mod.qweight, mod.scales, zeros, part, m, n, k, x2.stride(0), mod.qweight.stride(0),
                           mod.scales.stride(0), part.stride(0), part.stride(1), k // splits,
                           BITS=mod.spec.bits, GROUP=group, HAS_ZERO=mod.zeros is not None,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           DOT_F32=interpreting() or x.dtype == torch.float32)
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def quant_matmul_ref(x: torch.Tensor, mod: QuantLinear) -> torch.Tensor:
    return linear_ref(x, mod)
