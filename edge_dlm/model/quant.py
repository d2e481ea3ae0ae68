"""Weight-only quantization: group-wise int8 / int4 in plain torch, and bitsandbytes nf4 / LLM.int8.

Group-wise scheme (per output row, groups of `group_size` input columns):

    symmetric:   s = max|w| / qmax             q = clamp(round(w / s), -qmax - 1, qmax)   w' = q * s
    asymmetric:  s = (max - min) / (2^b - 1)   q = round((w - min) / s) in [0, 2^b - 1]   w' = q * s + min

with qmax = 2^(b-1) - 1. The zero point is the group minimum kept as a float (as HQQ and bitsandbytes
keep theirs), so no value is ever clipped and every element satisfies |w - w'| <= s / 2: that is the
bound the tests check. int4 packs two columns per byte (even column in the low nibble). Scales and
minimums are stored in fp16.

Tensors of a quantized module `X` (in safetensors): `X.qweight` (int8 `[out, in]` or uint8
`[out, in / 2]`), `X.scales` (`[out, in / group]`), `X.zeros` (asymmetric only); for nf4 `X.qweight`
(bitsandbytes' packed uint8) and `X.absmax`. The scheme itself is `config.json["quantization"]`.

Matmuls read the packed weights directly where the model's backend gives its layers a kernel
(`QuantLinear.kernel`, set by `edge_dlm.kernels.backend` at load, per module): on the CPU the C kernel of
`edge_dlm.kernels.cpu_matmul` (activations rounded to int8 per block of 32, int8 x int8 VNNI dot
products), which holds the weight in its own 16-row layout instead of `qweight` / `scales` / `zeros`
(`QuantLinear.derived`, built on first use or by `prepare`; the stored tensors are rebuilt from it,
exactly, for whatever reads them later); on CUDA the Triton kernel of `edge_dlm.kernels.quant_matmul`,
which reads `qweight` as it is. `dequantize` + `F.linear` is the reference (and the path of every other
layout, of a module without a kernel and of shapes a kernel declines: it returns None).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edge_dlm.primitives.errors import UserError, install_hint

GROUP_SIZES = (32, 64, 128)
STORED = ("qweight", "scales", "zeros")  # a QuantLinear's stored tensors (a kernel layout may stand in)
OWN_SCHEMES = ("int8", "int4")   # weight-only, group-wise, stored in safetensors
BNB_SCHEMES = ("nf4", "llm-int8")  # bitsandbytes
SCHEMES = OWN_SCHEMES + BNB_SCHEMES
BNB_HINT = f"install it with {install_hint('quant')}"

@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A quantization scheme as recorded in an artifact's config.json."""

    scheme: str
    group_size: int = 64
    symmetric: bool = True
    head: bool = True        # quantize diffusion_head too
    embedding: bool = True   # quantize the token embedding (int8/int4 only)
    # "edge-dlm": this module's layout; "compressed-tensors" / "gptq": read from those formats
    # (edge_dlm.model.formats): signed values, integer zero points, dequantized in the scales' dtype as
    # their reference implementations do, group size per module (0: per channel)
    layout: str = "edge-dlm"
    # "awq": weights rescaled and clipped on calibration tokens before quantizing (edge_dlm.model.awq)
    calibration: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UserError(f"quantization '{self.scheme}' not supported; known: {', '.join(SCHEMES)}")
        if self.calibration not in (None, "awq"):
            raise UserError(f"calibration '{self.calibration}' not supported; known: awq")
        if self.calibration and self.scheme not in OWN_SCHEMES:
            raise UserError(f"--calibrate is for int4 and int8 (bitsandbytes quantizes {self.scheme} itself)")
        if self.layout == "edge-dlm" and self.group_size not in GROUP_SIZES:
            raise UserError(f"group size {self.group_size} not supported; known: "
                            f"{', '.join(map(str, GROUP_SIZES))}")

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4, "nf4": 4, "llm-int8": 8}[self.scheme]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.layout == "edge-dlm":
            d.pop("layout")
        if self.calibration is None:
            d.pop("calibration")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def require_bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"nf4 / llm-int8 need bitsandbytes, which is not installed: {BNB_HINT}") from None
    return bitsandbytes


# --- group-wise int8 / int4 ----------------------------------------------------------------------

QUANTIZE_ROWS = 4096  # rows quantized at a time: float32 intermediates of a 131072-row head stay small


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """`w [out, in]` -> {"qweight", "scales"[, "zeros"]} (see the module docstring), `QUANTIZE_ROWS`
    rows at a time (each row's groups are its own, so the pieces are the whole)."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise UserError(f"group size {group_size} does not divide the input width {in_f}; "
                        f"pick one of {', '.join(str(g) for g in GROUP_SIZES if in_f % g == 0) or 'none'}")
    out = None  # written a slice of rows at a time (a concatenation would hold the result twice)
    for r in range(0, out_f, QUANTIZE_ROWS):
        part = _quantize_rows(w[r:r + QUANTIZE_ROWS], bits, group_size, symmetric)
        if r == 0 and len(part["qweight"]) == out_f:
            return part
        if out is None:
            out = {k: torch.empty((out_f, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][r:r + len(v)] = v
    return out


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> dict[str, torch.Tensor]:
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scales = (g.abs().amax(-1) / qmax).clamp_min(1e-10).half()  # fp16 scales are what we store...
        q = torch.round(g / scales.float()[..., None]).clamp(-qmax - 1, qmax)  # ...so quantize with them
        zeros = None
    else:
        levels = 2 ** bits - 1
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / levels).clamp_min(1e-10).half()
        zeros = lo.half()
        q = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None]).clamp(0, levels)
    q = q.reshape(out_f, in_f).to(torch.int8 if symmetric else torch.uint8)
    if bits == 4:
        q = pack_int4(q)
    out = {"qweight": q.contiguous(), "scales": scales.contiguous()}
    if zeros is not None:
        out["zeros"] = zeros.contiguous()
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values `[out, in]` (int8 in [-8, 7] or uint8 in [0, 15]) -> uint8 `[out, in / 2]`."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 `[out, in / 2]` -> int8 `[out, in]` (sign-extended when `signed`)."""
    if signed:  # arithmetic shifts on the int8 view sign-extend each nibble
        s = p.view(torch.int8)
        lo, hi = (s << 4) >> 4, s >> 4
    else:
        lo, hi = (p & 0xF).view(torch.int8), (p >> 4).view(torch.int8)
    return torch.stack((lo, hi), dim=-1).reshape(p.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               dtype: torch.dtype = torch.float32, int_zero: bool = False) -> torch.Tensor:
    """The inverse of `quantize`: `[out, in]` in `dtype`.

    `int_zero` (compressed-tensors, GPTQ): signed values and integer zero points, w = (q - zp) * s
    computed in the scales' dtype, then cast — their reference dequantization, bit for bit.
    """
    if int_zero:
        q = unpack_int4(qweight, signed=True) if bits == 4 else qweight
        out_f, n_groups = scales.shape
        g = q.to(scales.dtype).reshape(out_f, n_groups, -1)
        if zeros is not None:
            g = g - zeros.to(scales.dtype)[..., None]
        return (g * scales[..., None]).reshape(out_f, -1).to(dtype)
    q = unpack_int4(qweight, signed=zeros is None) if bits == 4 else qweight
    out_f, n_groups = scales.shape
    g = q.to(dtype).reshape(out_f, n_groups, -1) * scales.to(dtype)[..., None]
    if zeros is not None:
        g = g + zeros.to(dtype)[..., None]
    return g.reshape(out_f, -1)


class QuantLinear(nn.Module):
    """A bias-free linear layer holding group-wise int8/int4 weights; drop-in for `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec,
                 tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.register_buffer("qweight", tensors["qweight"])
        self.register_buffer("scales", tensors["scales"])
        self.register_buffer("zeros", tensors.get("zeros"))
        # GPTQ with act-order: stored columns are the input columns in this order (groups contiguous)
        self.register_buffer("perm", tensors.get("perm"))
        self._derived: dict[str, object] = {}  # kernel layouts of the weight, built on first use
        self._stored_from = None  # (restore, layout) while a kernel layout stands in for the stored tensors
        # the backend's matmul for this layer (`edge_dlm.kernels.backend`): kernel(x, module) -> y, or None
        # to decline a shape; `kernel.device_type` the device it runs on, `kernel.prepare(module)` (optional)
        # builds its weight layout ahead. None: the reference.
        self.kernel = None

    def derived(self, name: str, build: Callable[["QuantLinear"], object],
                restore: Callable[..., dict[str, torch.Tensor | None]] | None = None) -> object:
        """The weight in a kernel's own layout (`build(self)` once, then cached until moved).

        With `restore(layout, self[, blocks])` (the stored tensors back from the layout, exactly; with
        a slice of 16-row blocks, those rows only), the layout replaces `qweight` / `scales` / `zeros`
        in memory: they are dropped, and whatever reads them afterwards (`state_dict`, a device move,
        the reference matmul, export) gets them rebuilt from it, so a quantized model holds its weights
        once."""
        got = self._derived.get(name)
        if got is None:
            got = self._derived[name] = build(self)
            if restore is not None and self._stored_from is None and self._restores(restore, got):
                self._stored_from = (restore, got)
                for k in STORED:
                    if self._buffers[k] is not None:
                        page_out(self._buffers[k])
                    self._buffers[k] = None
        return got

    def rebind(self, name: str, layout) -> None:
        """The layout `name` (built) becomes `layout`, the same values held elsewhere (a view of the layout
        of several weights laid side by side: `edge_dlm.kernels.cpu_matmul.fuse`)."""
        assert name in self._derived, name
        self._derived[name] = layout
        if self._stored_from is not None:
            self._stored_from = (self._stored_from[0], layout)

    def _restores(self, restore, layout) -> bool:
        """Whether `restore` gives back the stored tensors: their dtypes, and the values of the first,
        a middle and the last 16-row block (restoring and comparing all of them cost as much as
        building the layout; `restore` itself is tested exact on every row)."""
        blocks = -(-self.out_features // 16)
        for b in sorted({0, blocks // 2, blocks - 1}):
            back = restore(layout, self, slice(b, b + 1))
            for k in STORED:
                a, s = back.get(k), self._buffers.get(k)
                if (a is None) != (s is None) or a is not None and (
                        a.dtype != s.dtype or a.shape[1:] != s.shape[1:] or not torch.equal(a, s[16 * b:16 * b + 16])):
                    return False
        return True

    def __getattr__(self, name: str):
        stored_from = self.__dict__.get("_stored_from")
        if name in STORED and stored_from is not None:
            restore, layout = stored_from
            return restore(layout, self)[name]
        return super().__getattr__(name)

    def _keep_stored(self) -> None:
        """Put the stored tensors back in place of a layout that stood in for them."""
        if self._stored_from is not None:
            restore, layout = self._stored_from
            self._buffers.update(restore(layout, self))
            self._stored_from = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._keep_stored()
        self._derived = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._stored_from is not None:
            restore, layout = self._stored_from
            destination.update({prefix + k: v for k, v in restore(layout, self).items() if v is not None})

    def prepare(self) -> None:
        """Build the kernel layouts this weight's matmul will use, now (before a compile traces the
        matmul: a layout built inside the trace would change the module and force a second compile).
        A kernel with a `prepare(module)` method builds its own."""
        kernel = self._kernel(self.weight.device.type)
        if kernel is not None and hasattr(kernel, "prepare"):
            kernel.prepare(self)

    def _kernel(self, device_type: str):
        """The backend's matmul where it runs this layer on `device_type` (a move elsewhere: the reference)."""
        k = self.kernel
        return k if k is not None and self.spec.layout == "edge-dlm" and k.device_type == device_type else None

    def _apply(self, fn, recurse=True):  # a device or dtype move invalidates the derived layouts
        self._keep_stored()
        self._derived = {}
        return super()._apply(fn, recurse)

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec) -> "QuantLinear":
        return cls(w.shape[1], w.shape[0], spec, quantize(w, spec.bits, spec.group_size, spec.symmetric))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight `[out, in]` (columns in `perm` order when there is one)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.spec.bits, dtype,
                          int_zero=self.spec.layout != "edge-dlm")

    def weight_in_input_order(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.dequantize(dtype)
        return w if self.perm is None else w[:, torch.argsort(self.perm)]

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects `.weight` (dtype, device); never rebuilt
        if self._stored_from is not None:  # the layout standing in: its own weight tensor
            layout = self._stored_from[1]
            return layout[0] if isinstance(layout, tuple) else layout
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        kernel = self._kernel(x.device.type)
        y = kernel(x, self) if kernel is not None else None
        return y if y is not None else linear_ref(x, self)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.in_features}, {self.out_features}, {s.scheme}, group={s.group_size}, "
                f"{'sym' if s.symmetric else 'asym'}")


def set_kernels(model: nn.Module, kernel) -> int:
    """Give `model`'s int8 / int4 layers `kernel` as their matmul (`QuantLinear.kernel`; a backend's);
    returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.spec.scheme in OWN_SCHEMES:
            mod.kernel, n = kernel, n + 1
    return n


def prepare_layouts(model: nn.Module) -> None:
    """Build the kernel layouts of `model`'s quantized weights now (the runtime does at load, so a first
    answer never waits for them; a compile must, before it traces a matmul). An embedding's rows are
    read, not multiplied: it keeps its stored layout."""
    lookups = {id(m.lin) for m in model.modules() if isinstance(m, QuantEmbedding)}
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and id(mod) not in lookups:
            mod.prepare()


def page_out(t: torch.Tensor) -> None:
    """Hand back the pages of a dropped tensor that lives in a mapped file (a safetensors checkpoint,
    read in place): no longer read, they would stay in the process's resident memory until the
    kernel needs them. A hint that never changes contents (`MADV_PAGEOUT`, Linux 5.4+); memory torch
    allocated itself is freed with the tensor instead."""
    import ctypes
    import platform

    if t.untyped_storage().resizable() or platform.system() != "Linux":
        return
    page = 4096
    start, end = -(-t.data_ptr() // page) * page, (t.data_ptr() + t.nbytes) // page * page
    if end > start:
        try:
            libc = ctypes.CDLL(None)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise(start, end - start, 21)  # MADV_PAGEOUT
        except (OSError, AttributeError):
            pass


def linear_ref(x: torch.Tensor, mod: QuantLinear) -> torch.Tensor:
    """The reference quantized matmul: dequantize the whole weight, then `F.linear`."""
    return F.linear(x, mod.dequantize(x.dtype))


class QuantEmbedding(nn.Module):
    """A token embedding stored like `QuantLinear` (`[vocab, hidden]`), dequantized row by row."""

    def __init__(self, lin: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin, self.dtype = lin, dtype  # dtype: the model's activations

    @property
    def weight(self) -> torch.Tensor:
        return self.lin.qweight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lin = self.lin
        rows = tokens.reshape(-1)
        z = lin.zeros[rows] if lin.zeros is not None else None
        out = dequantize(lin.qweight[rows], lin.scales[rows], z, lin.spec.bits, self.dtype)
        return out.reshape(*tokens.shape, lin.in_features)


# --- bitsandbytes --------------------------------------------------------------------------------

class NF4Linear(nn.Module):
    """bitsandbytes NF4 (blockwise absmax, `group_size` per block) through `bnb.matmul_4bit`."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec,
                 tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        bnb = require_bnb()
        from bitsandbytes.functional import QuantState, get_4bit_type

        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.register_buffer("qweight", tensors["qweight"])
        self.register_buffer("absmax", tensors["absmax"])
        self._bnb = bnb
        self._state = QuantState(absmax=self.absmax, shape=torch.Size((out_features, in_features)),
                                 code=get_4bit_type("nf4", device=self.absmax.device),
                                 blocksize=spec.group_size, quant_type="nf4", dtype=torch.float32)

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec) -> "NF4Linear":
        from bitsandbytes.functional import quantize_4bit

        require_bnb()
        q, st = quantize_4bit(w.float().contiguous(), blocksize=spec.group_size, quant_type="nf4",
                              compress_statistics=False)
        return cls(w.shape[1], w.shape[0], spec, {"qweight": q, "absmax": st.absmax})

    def _apply(self, fn, recurse=True):  # keep the QuantState on the buffers' device
        super()._apply(fn, recurse)
        self._state.absmax = self.absmax
        self._state.code = self._state.code.to(self.absmax.device)
        return self

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.qweight, self._state).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._state.dtype = x.dtype
        return self._bnb.matmul_4bit(x, self.qweight.t(), quant_state=self._state)


class LLMInt8Linear(nn.Module):
    """bitsandbytes LLM.int8 (`Linear8bitLt` in fp16, outlier threshold 6.0), load-time only, with the
    caller's activation dtype on both sides."""

    def __init__(self, w: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__()
        bnb = require_bnb()
        self.spec, self.in_features, self.out_features = spec, w.shape[1], w.shape[0]
        inner = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
        inner.weight = bnb.nn.Int8Params(w.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        self.inner = inner.to(w.device)  # moving to a device is what quantizes Int8Params

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).to(x.dtype)


# --- applying a scheme to a model ----------------------------------------------------------------

def quantizes(module: str, spec: QuantSpec) -> bool:
    """Whether `spec` quantizes the weight of checkpoint module `module` (a linear layer, the head,
    or the embedding) — the one rule for quantizing, storing and loading."""
    if module == "diffusion_head":
        return spec.head
    if module == "encoder.embed_tokens":
        return spec.embedding and spec.scheme in OWN_SCHEMES
    return True


def linear_names(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Qualified names of the `nn.Linear` modules the scheme quantizes."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and quantizes(n, spec)]


def quantized_shapes(name: str, out_f: int, in_f: int, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
    """The stored tensors (and shapes) that replace `name.weight [out_f, in_f]` under `spec`."""
    if spec.scheme == "nf4":
        return {f"{name}.qweight": (out_f * in_f // 2, 1), f"{name}.absmax": (out_f * in_f // spec.group_size,)}
    cols = in_f // 2 if spec.bits == 4 else in_f
    shapes = {f"{name}.qweight": (out_f, cols), f"{name}.scales": (out_f, in_f // spec.group_size)}
    if not spec.symmetric:
        shapes[f"{name}.zeros"] = shapes[f"{name}.scales"]
    return shapes


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer and of the kernel layouts of quantized weights (what the
    weights occupy in memory)."""
    seen, total = set(), 0
    layouts = [t for m in model.modules() if isinstance(m, QuantLinear) for got in m._derived.values()
               for t in (got if isinstance(got, tuple) else (got,)) if isinstance(t, torch.Tensor)]
    for t in list(model.parameters()) + list(model.buffers()) + layouts:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
