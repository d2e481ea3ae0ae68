"""Community quantized checkpoints: compressed-tensors (read and write) and GPTQ (read).

Both arrive as `config.json["quantization_config"]` and per-module tensors, and load into the same
`QuantLinear` the rest of edge-dlm runs (layout "compressed-tensors" / "gptq": signed values, integer
zero points, dequantized in the scales' dtype exactly as the reference implementations do).

compressed-tensors, format `pack-quantized` (what llm-compressor and GPTQModel write for weight-only
int4/int8, what vLLM and SGLang run with Marlin/Machete): `X.weight_packed` int32 `[out, in*b/32]`
(value + 2^(b-1), 32/b per word, element i at bit b*i), `X.weight_scale` `[out, groups]`,
`X.weight_shape`, and for asymmetric `X.weight_zero_point` int32 packed along the output dim; w = (q - zp)
* s. Strategies `group` and `channel`; activation quantization, other formats and act-order `g_idx`
are refused with the reason.

GPTQ (AutoGPTQ / GPTQModel, `quant_method: gptq`): `X.qweight` int32 `[in*b/32, out]` packed along the
input dim, `X.qzeros` int32 `[groups, out*b/32]`, `X.scales` `[groups, out]`, `X.g_idx` `[in]`;
w[o, i] = s[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) with z = stored + 1 in the v1 checkpoint format
(`checkpoint_format: gptq`, the default) and z = stored in `gptq_v2`. With act-order (`desc_act`) the
groups are not contiguous: the columns are stored sorted by group and the layer gathers its input in
that order (`QuantLinear.perm`).

Which modules are quantized is read from the files (a module with packed tensors is; one with
`.weight` is not): the `ignore` list of compressed-tensors and GPTQ's lm_head choice follow.
"""

from __future__ import annotations

import dataclasses

import torch

from edge_dlm.primitives.errors import CheckpointError, UserError

CT = "compressed-tensors"
GPTQ = "gptq"
CT_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclasses.dataclass(frozen=True)
class Community:
    layout: str  # CT or GPTQ
    bits: int
    symmetric: bool
    group_size: int  # 0: one group per row (channel)
    desc_act: bool = False
    zero_offset: int = 0  # GPTQ v1 stores zero - 1

    @property
    def scheme(self) -> str:
        return f"int{self.bits}"

    def spec(self):
        from edge_dlm.model.quant import QuantSpec

        return QuantSpec(self.scheme, group_size=self.group_size, symmetric=self.symmetric, embedding=False,
                         layout=self.layout)


def detect(raw: dict, where: str) -> Community | None:
    """The community format of a config.json dict, None when it has no `quantization_config`."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == CT:
        return _compressed_tensors(qc, where)
    if method == GPTQ:
        return _gptq(qc, where)
    raise CheckpointError(f"{where}: quantization_config quant_method {method!r} is not supported; edge-dlm "
                          "reads compressed-tensors (pack-quantized int4/int8 weights) and GPTQ checkpoints")


def _compressed_tensors(qc: dict, where: str) -> Community:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    found = set()
    for name, g in groups.items():
        if not isinstance(g, dict):
            raise CheckpointError(f"{where}: config group {name} must be an object")
        if g.get("input_activations") or g.get("output_activations"):
            raise CheckpointError(f"{where}: config group {name} quantizes activations; edge-dlm runs weight-only "
                                  "quantized checkpoints (W4A16 / W8A16)")
        fmt = g.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported; edge-dlm reads "
                                  "'pack-quantized' (int4/int8 weight-only)")
        w = g.get("weights") or {}
        if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
            raise CheckpointError(f"{where}: weights of {w.get('type')} {w.get('num_bits')} bits are not supported; "
                                  "edge-dlm reads int4 and int8")
        if w.get("strategy") not in ("group", "channel"):
            raise CheckpointError(f"{where}: weight strategy {w.get('strategy')!r} is not supported; edge-dlm reads "
                                  "'group' and 'channel'")
        if w.get("actorder") not in (None, "static", False):
            raise CheckpointError(f"{where}: act-order {w.get('actorder')!r} (weight_g_idx) is not supported")
        if w.get("dynamic"):
            raise CheckpointError(f"{where}: dynamic weight quantization is not a stored checkpoint")
        gs = int(w.get("group_size") or 0) if w.get("strategy") == "group" else 0
        found.add((int(w["num_bits"]), bool(w.get("symmetric", True)), gs))
    if len(found) > 1:
        raise CheckpointError(f"{where}: config groups with different weight schemes ({sorted(found)}) are not "
                              "supported; edge-dlm runs one scheme per checkpoint")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"{where}: quantization_status is {qc.get('quantization_status')!r}; only compressed "
                              "checkpoints hold packed weights")
    bits, sym, gs = found.pop()
    return Community(CT, bits, sym, gs)


def _gptq(qc: dict, where: str) -> Community:
    bits = qc.get("bits")
    if bits not in (4, 8):
        raise CheckpointError(f"{where}: GPTQ with {bits} bits is not supported; edge-dlm reads 4 and 8")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; edge-dlm reads gptq and "
                              "gptq_v2")
    gs = int(qc.get("group_size", 128))
    return Community(GPTQ, bits, bool(qc.get("sym", True)), max(gs, 0), bool(qc.get("desc_act", False)),
                     1 if fmt == "gptq" else 0)


def packed(module: str, files: dict, c: Community) -> bool:
    """Whether the checkpoint stores `module` quantized in format `c`."""
    return f"{module}.{'weight_packed' if c.layout == CT else 'qweight'}" in files


def stored_shapes(module: str, out_f: int, in_f: int, c: Community, files: dict) -> dict[str, tuple[int, ...]]:
    """The tensors (and shapes) a quantized `module [out_f, in_f]` is stored as."""
    per = 32 // c.bits
    if c.group_size and in_f % c.group_size:
        raise CheckpointError(f"{module}: group size {c.group_size} does not divide its input width {in_f}")
    groups = in_f // c.group_size if c.group_size else 1
    if c.layout == CT:
        shapes = {f"{module}.weight_packed": (out_f, -(-in_f // per)), f"{module}.weight_scale": (out_f, groups),
                  f"{module}.weight_shape": (2,)}
        if not c.symmetric:
            shapes[f"{module}.weight_zero_point"] = (-(-out_f // per), groups)
        return shapes
    shapes = {f"{module}.qweight": (in_f // per, out_f), f"{module}.qzeros": (groups, out_f // per),
              f"{module}.scales": (groups, out_f)}
    if f"{module}.g_idx" in files:
        shapes[f"{module}.g_idx"] = (in_f,)
    if f"{module}.bias" in files:
        shapes[f"{module}.bias"] = (out_f,)
    return shapes


def _unpack(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Unsigned b-bit values packed little-end-first into int32 along `dim` -> int32 values."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if dim == 1:  # [r, words] -> [r, words*per]
        v = (w[:, :, None] >> shifts) & ((1 << bits) - 1)
        return v.reshape(w.shape[0], -1)[:, :count].to(torch.int32)
    v = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [words, per, c]
    return v.reshape(-1, w.shape[1])[:count].to(torch.int32)


def _own_packing(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values `[out, in]` -> the QuantLinear storage (int8, or two nibbles per byte for int4)."""
    from edge_dlm.model.quant import pack_int4

    return pack_int4(q.to(torch.int8)) if bits == 4 else q.to(torch.int8).contiguous()


def build(module: str, out_f: int, in_f: int, c: Community, t: dict[str, torch.Tensor]):
    """A `QuantLinear` from a module's stored tensors in format `c` (the entries are consumed)."""
    from edge_dlm.model.quant import QuantLinear

    half = 1 << (c.bits - 1)
    if c.layout == CT:
        shape = t.pop(f"{module}.weight_shape").tolist()
        if shape != [out_f, in_f]:
            raise CheckpointError(f"{module}.weight_shape is {shape}, expected {[out_f, in_f]} from config.json")
        q = _unpack(t.pop(f"{module}.weight_packed"), c.bits, in_f, dim=1) - half
        scales = t.pop(f"{module}.weight_scale")
        zp = t.pop(f"{module}.weight_zero_point", None)
        zeros = None if zp is None else (_unpack(zp, c.bits, out_f, dim=0) - half).to(torch.int8)
        return QuantLinear(in_f, out_f, c.spec(), {"qweight": _own_packing(q, c.bits), "scales": scales.contiguous(),
                                                   **({"zeros": zeros.contiguous()} if zeros is not None else {})})
    q = _unpack(t.pop(f"{module}.qweight"), c.bits, in_f, dim=0).T  # [out, in], unsigned
    z = _unpack(t.pop(f"{module}.qzeros"), c.bits, out_f, dim=1).T + c.zero_offset  # [out, groups], unsigned
    scales = t.pop(f"{module}.scales").T.contiguous()  # [out, groups]
    g_idx = t.pop(f"{module}.g_idx", None)
    bias = t.pop(f"{module}.bias", None)
    if bias is not None and bool(bias.ne(0).any()):
        raise CheckpointError(f"{module} has a non-zero bias; NLD linear layers have none")
    n_groups = scales.shape[1]
    gs = in_f // n_groups
    default = torch.arange(in_f, dtype=torch.int64) // gs
    perm = None
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), default):
        g = g_idx.to(torch.int64)
        if g.min() < 0 or g.max() >= n_groups or not torch.equal(torch.bincount(g, minlength=n_groups),
                                                                  torch.full((n_groups,), gs)):
            raise CheckpointError(f"{module}.g_idx does not assign {gs} columns to each of {n_groups} groups")
        perm = torch.argsort(g, stable=True)
        q = q[:, perm]
    # signed storage: (q - z) = (q - 2^(b-1)) - (z - 2^(b-1))
    return QuantLinear(in_f, out_f, c.spec(), {"qweight": _own_packing(q - half, c.bits), "scales": scales,
                                               "zeros": (z - half).to(torch.int8).contiguous(),
                                               **({"perm": perm} if perm is not None else {})})


# ---- writing compressed-tensors ----------------------------------------------------------------------

def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned b-bit values -> int32 words along `dim` (the inverse of `_unpack`)."""
    per = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        return _pack(v.T, bits, 1).T.contiguous()
    rows, cols = v.shape
    v = torch.nn.functional.pad(v, (0, -cols % per)).reshape(rows, -1, per)
    words = (v << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def ct_tensors(module: str, lin) -> dict[str, torch.Tensor]:
    """A symmetric edge-dlm `QuantLinear` as compressed-tensors pack-quantized tensors (same numbers)."""
    from edge_dlm.model.quant import QUANTIZE_ROWS, unpack_int4

    bits = lin.spec.bits

    def packed(rows: torch.Tensor) -> torch.Tensor:  # a slice of rows at a time: _pack works in int64
        q = unpack_int4(rows, signed=True) if bits == 4 else rows
        return _pack(q.to(torch.int32) + (1 << (bits - 1)), bits, 1)

    n = lin.qweight.shape[0]
    parts = [packed(lin.qweight[r:r + QUANTIZE_ROWS]) for r in range(0, n, QUANTIZE_ROWS)]
    return {f"{module}.weight_packed": torch.cat(parts) if len(parts) > 1 else parts[0],
            f"{module}.weight_scale": lin.scales.contiguous(),
            f"{module}.weight_shape": torch.tensor([lin.out_features, lin.in_features], dtype=torch.int64)}


def ct_config(spec, ignore: list[str]) -> dict:
    """config.json's quantization_config for edge-dlm's symmetric group-wise weights."""
    import edge_dlm

    if not spec.symmetric:
        raise UserError("compressed-tensors stores integer zero points, edge-dlm's --asymmetric keeps a float "
                        "minimum per group: export --asymmetric with --format edge-dlm, or drop --asymmetric")
    return {"quant_method": CT, "format": "pack-quantized", "quantization_status": "compressed",
            "version": f"edge-dlm {edge_dlm.__version__}",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                          "input_activations": None, "output_activations": None,
                                          "weights": {"num_bits": spec.bits, "type": "int", "symmetric": True,
                                                      "strategy": "group", "group_size": spec.group_size,
                                                      "dynamic": False, "actorder": None}}},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}

