"""Rebuilding a model's layers to run another way, in place and sharing their weights: how a backend
(`edge_dlm.kernels.backend`) or the compiler (`compiled.RowsLinear`) changes the way a layer runs (the
module is replaced; its parameters, and so ties between layers, stay the same objects)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def replace_linears(model: nn.Module, pick: Callable[[nn.Linear], bool], cls: type[nn.Linear]) -> list[nn.Linear]:
    """Each `nn.Linear` of `model` (exactly: not one already rebuilt) that `pick` takes, replaced by a
    `cls` holding the same weight and bias; returns the new layers."""
    new = []
    for name, mod in list(model.named_modules()):
        if not name or type(mod) is not nn.Linear or not pick(mod):
            continue
        layer = cls(mod.in_features, mod.out_features, bias=False, device="meta")
        layer.weight, layer.bias = mod.weight, mod.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        new.append(layer)
    return new
