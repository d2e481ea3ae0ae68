"""Model configuration, read from a checkpoint's `config.json`.

Frozen dataclasses built with `from_dict`, which ignores keys it does not know (the real NLD config
carries training-only keys such as `ar_loss_weight` and `auto_map`). Decode-critical values (mask id,
block size, eos) always come from the checkpoint, never from constants in the code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from edge_dlm.primitives.errors import CheckpointError
from edge_dlm.primitives.inputs import read_json_object

SUPPORTED_MODEL_TYPES = ("nemotron_labs_diffusion",)
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings", "block_size")
MAX_CONTEXT = 1 << 24  # tokens: far beyond any NLD checkpoint, small enough that positions stay exact


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _matches(v: Any, tp: Any) -> bool:
    """Whether JSON value `v` has annotated type `tp` (ints are not bools, floats are finite)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in typing.get_args(tp))
    tp = typing.get_origin(tp) or tp
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, tp) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object"}
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return " or ".join(names.get(typing.get_origin(a) or a, str(a)) for a in args)


def _typed(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    """The known fields of `d` for dataclass `cls`, each checked against its annotation first."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in d and d[f.name] is not None and not dataclasses.is_dataclass(hints[f.name]):
            v = d[f.name]
            if not _matches(v, hints[f.name]):
                want = "an integer token id" if f.name.endswith("_token_id") else _describe(hints[f.name])
                raise CheckpointError(f"config.json: {where}{f.name} must be {want}, got {str(v)[:40]!r} "
                                      f"({type(v).__name__})")
            out[f.name] = v
    return out


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters (`rope_parameters` in config.json): default or YaRN, plus the Llama-4 query scale."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RopeConfig":
        if d is not None and not isinstance(d, dict):
            raise CheckpointError(f"config.json: rope_parameters must be an object, got {type(d).__name__}")
        d = dict(d or {})
        if "type" in d and "rope_type" not in d:
            d["rope_type"] = d.pop("type")
        cfg = cls(**_typed(cls, d, "rope_parameters."))
        if cfg.rope_type not in ("default", "yarn"):
            raise CheckpointError(f"rope_type '{cfg.rope_type}' not supported; known: default, yarn")
        return cfg

    def yarn_attention_factor(self) -> float:
        """The YaRN cos/sin scale (1.0 for NLD, where mscale == mscale_all_dim)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


@dataclasses.dataclass(frozen=True)
class NLDConfig:
    """The architecture and decode-critical ids of a Nemotron-Labs-Diffusion checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    mask_token_id: int
    eos_token_id: int
    bos_token_id: int | None = None
    block_size: int = 32
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    model_type: str = "nemotron_labs_diffusion"
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    # Present only in artifacts written by `edge-dlm export`: how the linear weights are stored.
    quantization: dict[str, Any] | None = None

    @property
    def gqa_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NLDConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type '{model_type}' not supported; known: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        d = dict(d)
        for key in SIZES:  # types first: the derivations below divide by them
            if d.get(key) is not None and not _positive_int(d[key]):
                raise CheckpointError(f"config.json: {key} must be a positive integer, got {d[key]!r}")
        if d.get("head_dim") is None and "hidden_size" in d and "num_attention_heads" in d:
            if d["hidden_size"] % d["num_attention_heads"]:
                raise CheckpointError(f"config.json: hidden_size {d['hidden_size']} is not divisible by "
                                      f"num_attention_heads {d['num_attention_heads']} (and no head_dim is given)")
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):  # HF allows a list; the decoding contract has one EOS
            d["eos_token_id"] = eos[0] if eos else None
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if isinstance(rope, dict) and "rope_theta" not in rope and "rope_theta" in d:
            rope = {**rope, "rope_theta": d["rope_theta"]}
        kw = _typed(cls, d, "")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name != "rope" and kw.get(f.name) is None]
        if missing:
            raise CheckpointError(f"config.json lacks required keys: {', '.join(missing)}")
        cfg = cls(rope=RopeConfig.from_dict(rope), **kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "NLDConfig":
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json")
        return cls.from_dict(read_json_object(path, str(path), error=CheckpointError))

    def validate(self) -> None:
        for key in SIZES:
            if not _positive_int(getattr(self, key)):
                raise CheckpointError(f"config.json: {key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("mask_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise CheckpointError(f"config.json: {key} must be an integer token id, got {v!r}")
        if self.max_position_embeddings > MAX_CONTEXT:
            raise CheckpointError(f"config.json: max_position_embeddings {self.max_position_embeddings} is beyond "
                                  f"the {MAX_CONTEXT} tokens edge-dlm supports")
        if self.head_dim % 2:
            raise CheckpointError(f"config.json: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if not _positive_number(self.rms_norm_eps):
            raise CheckpointError(f"config.json: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not _positive_number(self.rope.rope_theta) or not _positive_number(self.rope.factor):
            raise CheckpointError("config.json: rope_theta and the rope factor must be positive numbers")
        if self.mask_token_id == self.eos_token_id:
            raise CheckpointError(f"config.json: mask_token_id and eos_token_id are both {self.eos_token_id}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise CheckpointError(f"bos_token_id {self.bos_token_id} is outside the vocabulary")
        if self.block_size > self.max_position_embeddings:
            raise CheckpointError(f"block_size {self.block_size} exceeds the context ({self.max_position_embeddings})")
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act '{self.hidden_act}' not supported; known: silu")
        if self.attention_bias or self.mlp_bias:
            raise CheckpointError("attention_bias / mlp_bias are not supported by the NLD architecture")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise CheckpointError(f"mask_token_id {self.mask_token_id} is outside the vocabulary")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise CheckpointError(f"eos_token_id {self.eos_token_id} is outside the vocabulary")
        if self.block_size < 1:
            raise CheckpointError(f"block_size must be >= 1, got {self.block_size}")

    def parameter_count(self) -> int:
        """Weights the config implies (embedding, head, layers), computed without building any shape."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h + 2 * q * h + 2 * kv * h + 3 * i * h
        return 2 * v * h + h + self.num_hidden_layers * per_layer

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (as NVIDIA writes it), for exporters and test checkpoints."""
        d = dataclasses.asdict(self)
        rope = d.pop("rope")
        d["rope_parameters"] = {k: v for k, v in rope.items() if v is not None}
        d["architectures"] = ["NemotronLabsDiffusionModel"]
        if d.get("quantization") is None:
            d.pop("quantization")
        return d
