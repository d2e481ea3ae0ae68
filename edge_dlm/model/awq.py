"""Calibrated int4 / int8: an activation-aware scale and clipping search (AWQ's method) before quantizing.

Weight-only quantization spends its error evenly over a weight's input channels, but a few channels
carry large activations and dominate the output error. Over a few hundred calibration tokens
(`calibration_tokens`: the bundled code and prose prompts, tokenized with the model's tokenizer):

1. Scales. For each group of linears fed by one tensor (q/k/v after `input_layernorm`, gate/up
   after `post_attention_layernorm`, down after `up_proj`, the head after the final norm), per input
   channel `s = mean|x| ^ alpha` (normalized), with alpha on a grid in [0, 1] chosen to minimize
   `|| x W^T - (x / s) Q(W diag(s))^T ||^2` summed over the group. The weights take `diag(s)`, the
   op before them `1 / s` (norm weights, or up_proj's rows), so the float model computes the same
   function and the file format and kernels are unchanged. o_proj is left alone: its input is the
   attention output, whose channels repeat over the query heads of a KV head (GQA).
2. Clipping. Per (row, group), the clip ratio in {1, 0.95, ..., 0.5} of max|w| that minimizes that
   group's output error over the calibration inputs.

Then `quantize_model` quantizes as usual; `QuantSpec.calibration` records "awq" in config.json.
Inputs are the float model's own activations, gathered once with forward hooks.
"""

from __future__ import annotations


import torch
from torch import nn

from edge_dlm.model.quant import QuantSpec, dequantize, quantize

ALPHAS = [i / 20 for i in range(21)]
CLIPS = [1.0 - i * 0.05 for i in range(11)]
MAX_TOKENS = 512    # calibration tokens used (a few hundred are enough for the statistics)
ROW_CHUNK = 512     # output rows per error evaluation (bounds memory at the real shapes)


def calibration_tokens(tokenizer) -> torch.Tensor:
    """The bundled code and prose prompts as one `[1, T]` token sequence (T <= MAX_TOKENS)."""
    from edge_dlm.primitives.prompts import bundled

    ids: list[int] = []
    for text in bundled("code") + bundled("prose"):
        ids += tokenizer.encode(text)  # each starts with BOS, as a prompt does
    return torch.tensor([ids[:MAX_TOKENS]])


def _qdq(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize `w` (fp32) as `quantize_model` will."""
    t = quantize(w, spec.bits, spec.group_size, spec.symmetric)
    return dequantize(t["qweight"], t["scales"], t.get("zeros"), spec.bits)


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    err = 0.0
    for r in range(0, w.shape[0], ROW_CHUNK):
        err += (x @ (w[r:r + ROW_CHUNK] - w_hat[r:r + ROW_CHUNK]).t()).pow(2).sum().item()
    return err


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Per-input-channel scale `s` (fp32) for linears of `weights` that all read `x [T, in]`."""
    act = x.abs().mean(0).clamp_min(1e-5)
    best, best_s = None, torch.ones_like(act)
    for alpha in ALPHAS:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(_output_error(x, w, _qdq(w * s, spec) / s) for w in weights)
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def search_clip(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`w` clipped per (row, group) to the ratio of max|w| with the least output error (symmetric:
    the quantizer's scale follows the clipped maximum)."""
    g = spec.group_size
    out_f, in_f = w.shape
    xg = x.reshape(x.shape[0], in_f // g, g)
    result = w.clone()
    for r in range(0, out_f, ROW_CHUNK):
        wg = w[r:r + ROW_CHUNK].reshape(-1, in_f // g, g)
        amax = wg.abs().amax(-1, keepdim=True)
        best_err = best = None
        for ratio in CLIPS:
            clipped = wg.clamp(-amax * ratio, amax * ratio)
            q = _qdq(clipped.reshape(-1, in_f), spec).reshape_as(wg)
            err = torch.einsum("tgk,ngk->tng", xg, wg - q).pow(2).sum(0)  # [rows, groups]
            if best is None:
                best_err, best = err, clipped
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better[..., None], clipped, best)
        result[r:r + ROW_CHUNK] = best.reshape(-1, in_f)
    return result


@torch.no_grad()
def calibrate(model: nn.Module, spec: QuantSpec, tokens: torch.Tensor, log=lambda *_: None) -> None:
    """Rescale and clip a float model's weights in place for `spec` (see the module docstring)."""
    from edge_dlm.model.quant import quantizes

    layers = model.encoder.layers
    inputs: dict[str, torch.Tensor] = {}
    watched = {"diffusion_head": model.diffusion_head}
    for i, layer in enumerate(layers):
        watched.update({f"{i}.attn": layer.self_attn.q_proj, f"{i}.o": layer.self_attn.o_proj,
                        f"{i}.mlp": layer.mlp.gate_proj, f"{i}.down": layer.mlp.down_proj})
    hooks = [mod.register_forward_pre_hook(lambda m, a, key=key: inputs.__setitem__(key, a[0].reshape(-1, a[0].shape[-1]).float()))
             for key, mod in watched.items()]
    try:
        tokens = tokens.to(model.encoder.norm.weight.device)
        model(tokens, torch.arange(tokens.shape[1], device=tokens.device)[None])
    finally:
        for h in hooks:
            h.remove()

    def scale_group(x, linears, before_fn):
        s = search_scale(x, [lin.weight.float() for lin in linears], spec)
        for lin in linears:
            lin.weight.copy_(lin.weight.float() * s)
        before_fn(s)
        return x / s

    def clip(x, lin):
        lin.weight.copy_(search_clip(x, lin.weight.float(), spec))

    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        x = scale_group(inputs[f"{i}.attn"], [attn.q_proj, attn.k_proj, attn.v_proj],
                        lambda s, w=ln1: w.copy_(w.float() / s))
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            clip(x, lin)
        clip(inputs[f"{i}.o"], attn.o_proj)
        x = scale_group(inputs[f"{i}.mlp"], [mlp.gate_proj, mlp.up_proj], lambda s, w=ln2: w.copy_(w.float() / s))
        for lin in (mlp.gate_proj, mlp.up_proj):
            clip(x, lin)
        # down_proj reads silu(gate) * up: its 1 / s goes into up_proj's rows
        x = scale_group(inputs[f"{i}.down"], [mlp.down_proj],
                        lambda s, up=mlp.up_proj: up.weight.copy_(up.weight.float() / s[:, None]))
        clip(x, mlp.down_proj)
        log(f"calibrated layer {i + 1}/{len(layers)}")
    if quantizes("diffusion_head", spec):
        norm = model.encoder.norm.weight
        x = scale_group(inputs["diffusion_head"], [model.diffusion_head], lambda s: norm.copy_(norm.float() / s))
        clip(x, model.diffusion_head)
