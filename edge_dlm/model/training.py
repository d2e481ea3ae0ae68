"""The NLD training objective (`nld.md`, "Training objective"), for the demo model and tests.

Input is the noisy and the clean copy side by side, `[x_t | x_0]`, both at positions `0..n-1`.
Mask ("sbd_block_diff"): a noisy token sees the noisy tokens of its own block and the clean tokens
of strictly earlier blocks; clean tokens are causal among themselves.
Noise: per sequence `t ~ U(0, 1)`, `p = (1 - 1e-3) t + 1e-3`; each token becomes the mask id with
probability `p`.
Loss: `(w_dlm * sum_masked CE(noisy[i], x0[i]) / p + w_ar * sum_i CE(clean[i], x0[i+1]))`
normalised by `#masked + w_ar * n` (NVIDIA: `w_dlm = 0.3`, `w_ar = 1.0`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from edge_dlm.model.nld import NLDModel


def sbd_block_diff_mask(n: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`[2n, 2n]` bool: rows/cols `0..n-1` are the noisy copy, `n..2n-1` the clean copy."""
    idx = torch.arange(n, device=device)
    blk = idx // block
    noisy_noisy = blk[:, None] == blk[None, :]
    noisy_clean = blk[None, :] < blk[:, None]
    clean_clean = idx[None, :] <= idx[:, None]
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros(n, n, dtype=torch.bool, device=device), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def add_noise(x0: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
              eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x0 [N, n]` -> (x_t, masked bool [N, n], p [N, 1])."""
    t = torch.rand(x0.shape[0], 1, generator=generator, device=x0.device)
    p = (1 - eps) * t + eps
    masked = torch.rand(x0.shape, generator=generator, device=x0.device) < p
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, p


def nld_loss(model: NLDModel, x0: torch.Tensor, *, block: int, mask_id: int, w_dlm: float = 0.3,
             w_ar: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The joint AR + masked-diffusion loss for a batch `x0 [N, n]`; returns (loss, stats)."""
    n_seq, n = x0.shape
    xt, masked, p = add_noise(x0, mask_id, generator)
    tokens = torch.cat([xt, x0], dim=1)  # [N, 2n]
    pos = torch.arange(n, device=x0.device).repeat(2)[None].expand(n_seq, -1)
    h = model.hidden(tokens, pos, mask=sbd_block_diff_mask(n, block, x0.device))  # [N, 2n, H]
    head = model.diffusion_head
    # diffusion: masked noisy positions predict their own token
    hm = h[:, :n][masked]  # [#masked, H]
    ce_dlm = F.cross_entropy(head(hm).float(), x0[masked], reduction="none")
    dlm = (ce_dlm / p.expand_as(masked)[masked]).sum()
    # AR: clean position i predicts i+1
    ce_ar = F.cross_entropy(head(h[:, n:-1]).flatten(0, 1).float(), x0[:, 1:].flatten(), reduction="sum")
    denom = masked.sum() + w_ar * n_seq * (n - 1)
    loss = (w_dlm * dlm + w_ar * ce_ar) / denom
    stats = {"ar_ce": ce_ar.item() / (n_seq * (n - 1)),
             "dlm_ce": ce_dlm.mean().item() if ce_dlm.numel() else 0.0}
    return loss, stats


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model: NLDModel, batches: Iterator[torch.Tensor], *, steps: int, lr: float = 3e-3,
          warmup: int = 50, weight_decay: float = 0.1, w_dlm: float = 0.3, w_ar: float = 1.0,
          seed: int = 0, time_budget_s: float | None = None,
          log: Callable[[int, float, dict], None] | None = None) -> int:
    """AdamW with warmup + cosine decay and gradient clipping; returns the steps run (a time budget
    may end training early, and the schedule then decays over the steps that fit)."""
    cfg = model.config
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    total = steps
    step = 0
    for step in range(steps):
        if time_budget_s is not None and step > 10:
            per_step = (time.perf_counter() - start) / step
            total = min(steps, int(time_budget_s / per_step))
            if step >= total:
                break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        x0 = next(batches)
        loss, stats = nld_loss(model, x0, block=cfg.block_size, mask_id=cfg.mask_token_id,
                               w_dlm=w_dlm, w_ar=w_ar, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None:
            log(step, loss.item(), stats)
    else:
        step = steps
    model.eval()
    return step


def init_weights(model: NLDModel, seed: int = 0, std: float = 0.02) -> None:
    """GPT-2-style init: normal(0, std), residual projections scaled by 1/sqrt(2 * layers)."""
    g = torch.Generator().manual_seed(seed)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = std / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
