"""A whole model quantized: in place on load (`quantize_model`, AWQ-calibrated first when the spec
asks), as the tensors an artifact stores (`quantized_state`), and rebuilt from them (`build_quantized`).
The per-tensor formats and the quantized modules are `edge_dlm.model.quant`."""

from __future__ import annotations

import torch
from torch import nn

from edge_dlm.model import awq
from edge_dlm.model.quant import (LLMInt8Linear, NF4Linear, QuantEmbedding, QuantLinear, QuantSpec, linear_names,
                                  page_out, quantizes)
from edge_dlm.primitives.errors import UserError


def quantize_model(model: nn.Module, spec: QuantSpec, tokenizer=None, log=lambda *_: None) -> nn.Module:
    """Quantize a loaded model in place (the `--quant` load-time path) and return it; a calibrated
    spec first calibrates on the bundled prompts through `tokenizer` (edge_dlm.model.awq)."""
    if spec.calibration:
        if tokenizer is None:
            raise UserError("calibrated quantization needs the model's tokenizer")
        awq.calibrate(model, spec, awq.calibration_tokens(tokenizer)[:, :model.config.max_position_embeddings], log)
    for name in linear_names(model, spec):
        lin = model.get_submodule(name)
        w = lin.weight.detach()
        if spec.scheme == "nf4":
            new = NF4Linear.from_weight(w, spec).to(w.device)
        elif spec.scheme == "llm-int8":
            new = LLMInt8Linear(w, spec)
        else:
            new = QuantLinear.from_weight(w, spec).to(w.device)
        model.set_submodule(name, new)
        page_out(w)  # a checkpoint's float weight read in place: its pages go back now
    if quantizes("encoder.embed_tokens", spec):
        emb = model.encoder.embed_tokens
        lin = QuantLinear.from_weight(emb.weight.detach(), spec).to(emb.weight.device)
        model.encoder.embed_tokens = QuantEmbedding(lin, emb.weight.dtype)
        page_out(emb.weight)
    return model


def quantized_state(model: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """A quantized model's tensors as an artifact stores them (float tensors stay in their dtype)."""
    if spec.scheme == "llm-int8":
        raise UserError("llm-int8 is a load-time option (bitsandbytes re-quantizes on load); "
                        "export int8, int4 or nf4 instead")
    state = {}
    for name, t in model.state_dict().items():
        state[name.replace("embed_tokens.lin.", "embed_tokens.")] = t
    return state


def build_quantized(model: nn.Module, spec: QuantSpec, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> None:
    """Swap quantized modules into a (meta-device) model and fill them from an artifact's `tensors`.

    Consumes the quantized entries of `tensors`; the float ones stay for `load_state_dict`.
    """
    for name in linear_names(model, spec):
        lin = model.get_submodule(name)
        own = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "scales", "zeros", "absmax")
               if f"{name}.{k}" in tensors}
        cls = NF4Linear if spec.scheme == "nf4" else QuantLinear
        model.set_submodule(name, cls(lin.in_features, lin.out_features, spec, own))
    if quantizes("encoder.embed_tokens", spec):
        emb = model.encoder.embed_tokens
        own = {k: tensors.pop(f"encoder.embed_tokens.{k}") for k in ("qweight", "scales", "zeros")
               if f"encoder.embed_tokens.{k}" in tensors}
        model.encoder.embed_tokens = QuantEmbedding(
            QuantLinear(emb.embedding_dim, emb.num_embeddings, spec, own), dtype)
