"""The CPU kernels' operators through ctypes, for an install where no C++ compiler built their C++ form
(`cpu_build._register` registers these instead; `cpu_ops.cpp` is the C++ form, which they equal bit for bit:
the same kernels, the same checks, raised as one RuntimeError). Only the matmuls and the narrow attention:
the small operations of a layer are C++ only (through ctypes a call would cost about what it saves)."""

from __future__ import annotations

import torch


kernels = None  # the kernels library (a ctypes.CDLL) `cpu_build.bind` points the operators at


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def x16_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, group: int, n: int) -> torch.Tensor:
    """`x [M, K]` float32 . W^T -> `[M, n]` float32, W int8 / int4 in the 16-row layout of
    `x16_layout` (`weight`, fp16 `scales` / `zeros`); x rounded to int8 per block of 32 columns."""
    x = x.contiguous()
    m, k = x.shape
    blocks = -(-n // 16)
    _require(x.dtype == torch.float32 and bits in (8, 4) and k % 32 == 0 and group >= 32 and not group & (group - 1)
             and k % group == 0 and weight.dtype == torch.uint8 and weight.numel() == blocks * 16 * k * bits // 8
             and scales.dtype == torch.float16 and scales.numel() == blocks * k // group * 16
             and (zeros is None or zeros.shape == scales.shape) and weight.is_contiguous() and scales.is_contiguous(),
             "x16_gemm takes x [M, K] float32 (K a multiple of 32) and an int8 / int4 16-row layout of n x K")
    y = torch.empty(m, n, dtype=torch.float32)
    _require(m == 0 or kernels.x16_gemm(bits, x.data_ptr(), m, k, weight.data_ptr(), scales.data_ptr(),
                                               _ptr(zeros), n, group, y.data_ptr(), torch.get_num_threads()) == 0,
             "x16_gemm: out of memory")
    return y


def _require(ok: bool, what: str) -> None:
    """The C++ operators' checks, for the ctypes implementations (`TORCH_CHECK` raises RuntimeError)."""
    if not ok:
        raise RuntimeError(what)


def bf16_gemm(x: torch.Tensor, weight: torch.Tensor, bf16_out: bool = False) -> torch.Tensor:
    """`x [..., M, K]` bfloat16 . `weight [N, K]` bfloat16^T -> `[..., M, N]` float32 (sums in float32), or
    rounded to bfloat16 (`bf16_out`: what a bf16 linear layer returns)."""
    _require(x.dim() >= 2 and x.dtype == torch.bfloat16, "bf16_gemm takes x [..., M, K] and weight [N, K] bfloat16")
    shape, x = x.shape, x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x.shape
    n = weight.shape[0]
    _require(x.dtype == weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] == k and k % 32 == 0
             and weight.is_contiguous(), "bf16_gemm takes x [..., M, K] and weight [N, K] bfloat16, K a multiple of 32")
    y = torch.empty(m, n, dtype=torch.float32)
    _require(m == 0 or kernels.bf16_gemm(x.data_ptr(), m, k, weight.data_ptr(), n, y.data_ptr(),
                                                torch.get_num_threads()) == 0, "bf16_gemm: out of memory")
    y = y.reshape(*shape[:-1], n)
    return y.to(torch.bfloat16) if bf16_out else y


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, length: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Attention of `q [H, R, D]` over `k` / `v [H, W, D]` (rows contiguous) under `mask [T, W]`, keys
    past `length + T` unseen: the C kernel `attend` (kernels/csrc/attend.c)."""
    q, mask = q.contiguous(), mask.contiguous()
    h, r, d = q.shape
    t, w = mask.shape
    out = torch.empty(q.shape)
    keys = min(w, int(length) + t)
    _require(q.dtype == k.dtype == v.dtype == torch.float32 and k.shape == v.shape and k.stride() == v.stride()
             and k.shape[0] == h and k.shape[2] == d and k.stride(1) == d and k.stride(2) == 1 and d % 16 == 0
             and mask.dtype == torch.bool and mask.shape[1] == k.shape[1] and r % t == 0 and keys >= t,
             "attend takes float32 q [H, R, D], k / v [H, W, D] (rows side by side, D a multiple of 16), mask [T, W]")
    _require(kernels.attend(q.data_ptr(), h, r, t, d, k.data_ptr(), v.data_ptr(), k.stride(0), mask.data_ptr(),
                                   w, keys, scale, out.data_ptr(), torch.get_num_threads()) == 0, "attend: out of memory")
    return out
