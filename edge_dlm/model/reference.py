"""The third-party reference: transformers' `Ministral3ForCausalLM` on an NLD checkpoint's weights
(`encoder.*` -> `model.*`, `diffusion_head` -> `lm_head`). The parity oracle in tests and the
baseline in `edge-dlm bench`. Needs `transformers` (the `reference` / `test` extras)."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_dlm.model.config import NLDConfig
from edge_dlm.primitives.errors import require
from edge_dlm.model.weights import read_tensors, weight_files


def to_transformers(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str = "eager"):
    transformers = require("transformers", "reference", "the transformers reference model")
    transformers.logging.set_verbosity_error()  # YaRN factor notice on toy configs
    path = Path(path)
    cfg = NLDConfig.from_file(path / "config.json")
    rope = {k: v for k, v in cfg.to_dict()["rope_parameters"].items() if k != "truncate"}
    hf_cfg = transformers.Ministral3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id,
        tie_word_embeddings=False, rope_parameters=rope)
    hf_cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = transformers.Ministral3ForCausalLM(hf_cfg)
    tensors = read_tensors(weight_files(path))
    renamed = {("lm_head.weight" if k == "diffusion_head.weight" else k.replace("encoder.", "model.", 1)):
               v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False, assign=True)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    # the rotary buffers were built on the meta device: rebuild them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg).to(device)
    return model.eval()
