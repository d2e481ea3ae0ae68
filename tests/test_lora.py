"""The LinearSpec LoRA drafter: loaded from linear_spec_lora/, equal to the merged weight, used only in drafts."""

from __future__ import annotations

import torch

from edge_dlm.primitives.attention import BLOCK
from edge_dlm.decoding import Draft
from edge_dlm.model.weights import load_model
from helpers import run_mode

PROMPT = [1, 40, 41, 42, 43, 44]


def test_lora_equals_merged_weight(tiny_ckpt):
    with_lora = load_model(tiny_ckpt)
    merged = load_model(tiny_ckpt, lora=False)
    with torch.no_grad():
        for a, b in zip(with_lora.encoder.layers, merged.encoder.layers):
            A, B, scale = a.self_attn.o_lora
            assert scale == 16.0 / 4  # lora_alpha / r from adapter_config.json
            b.self_attn.o_proj.weight += scale * B @ A  # W' = W + (alpha / r) B A
        x, pos = torch.tensor([[5, 3, 3, 3]]), torch.arange(4)[None]
        lora_out = with_lora(x, pos, mask=BLOCK.new_mask(4), use_lora=True)
        plain_out = with_lora(x, pos, mask=BLOCK.new_mask(4))
        assert torch.allclose(lora_out, merged(x, pos, mask=BLOCK.new_mask(4)), atol=1e-5)
        assert not torch.allclose(lora_out, plain_out, atol=1e-3)  # the adapter really changes the draft


def test_lora_changes_drafts_not_output(tiny_ckpt):
    model = load_model(tiny_ckpt)
    assert all(layer.self_attn.o_lora is not None for layer in model.encoder.layers)
    ar, _ = run_mode(model, PROMPT, "ar", max_new_tokens=32)
    on, ev_on = run_mode(model, PROMPT, "linear-spec", max_new_tokens=32)
    off, ev_off = run_mode(model, PROMPT, "linear-spec", max_new_tokens=32, use_lora=False)
    assert on.output_ids == off.output_ids == ar.output_ids  # verification never uses the adapter
    drafts_on = [e.tokens for e in ev_on if isinstance(e, Draft)]
    drafts_off = [e.tokens for e in ev_off if isinstance(e, Draft)]
    assert drafts_on != drafts_off


def test_no_lora_flag(tiny_ckpt):
    import edge_dlm

    assert edge_dlm.load(tiny_ckpt, device="cpu").has_lora
    assert not edge_dlm.load(tiny_ckpt, device="cpu", lora=False).has_lora
    from edge_dlm.cli import build_parser

    assert build_parser().parse_args(["generate", "--prompt", "x", "--no-lora"]).no_lora
