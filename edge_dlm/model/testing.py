"""Tiny random NLD checkpoints, written in the real format, for tests and examples.

    path = write_tiny_checkpoint(tmp_path / "ckpt", kv_heads=2, lora=True)

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_dlm.model.config import NLDConfig, RopeConfig

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<mask>", "[INST]", "[/INST]"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'system' %}[INST]{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
)
SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Block diffusion language models denoise many tokens in parallel.",
    "import os\nprint(os.getcwd())\n",
]


def build_tokenizer(texts, vocab_size: int, out_dir: Path, chat_template: str = CHAT_TEMPLATE,
                    split: str | None = None) -> int:
    """Train a byte-level BPE on `texts`, write tokenizer.json + tokenizer_config.json; return its size.
    `split`: a regex that splits text before the byte-level step (as Tekken tokenizers do, e.g.
    `edge_dlm.primitives.tokenizer.TEKKEN_REGEX`); None: GPT-2's, inside the byte-level step.

    Special tokens take ids 0..5: <unk>, <s> (bos), </s> (eos), <mask>, [INST], [/INST].
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>",
        "chat_template": chat_template, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2) + "\n", encoding="utf-8")
    return tok.get_vocab_size()


def tiny_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 16, intermediate: int = 128, block_size: int = 4,
                original_max: int = 64, max_positions: int = 4096, yarn: bool = True) -> NLDConfig:
    """An NLD config at toy size; YaRN + Llama-4 scale active past `original_max` positions."""
    rope = RopeConfig(rope_type="yarn", rope_theta=10000.0, factor=16.0,
                      original_max_position_embeddings=original_max, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1) if yarn else RopeConfig()
    return NLDConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, max_position_embeddings=max_positions, mask_token_id=3,
                     eos_token_id=2, bos_token_id=1, block_size=block_size, rms_norm_eps=1e-5,
                     torch_dtype="float32", rope=rope)


def random_state(cfg: NLDConfig, seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    from edge_dlm.model.weights import expected_shapes

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = std * torch.randn(shape, generator=g)
    return state


def write_lora(path: Path, cfg: NLDConfig, *, r: int = 4, alpha: float = 16.0, seed: int = 1,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a PEFT-format `linear_spec_lora/` adapter on every `o_proj` (random unless `state`)."""
    from safetensors.torch import save_file

    lora_dir = path / "linear_spec_lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        g = torch.Generator().manual_seed(seed)
        q = cfg.num_attention_heads * cfg.head_dim
        state = {}
        for i in range(cfg.num_hidden_layers):
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_"
            state[key + "A.weight"] = 0.1 * torch.randn(r, q, generator=g)
            state[key + "B.weight"] = 0.1 * torch.randn(cfg.hidden_size, r, generator=g)
    save_file({k: v.contiguous() for k, v in state.items()}, str(lora_dir / "adapter_model.safetensors"))
    (lora_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["o_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}, indent=2) + "\n", encoding="utf-8")


def write_tiny_checkpoint(path: str | Path, *, seed: int = 0, lora: bool = False,
                          vocab_size: int = 320, texts=None, split: str | None = None, **config_kw) -> Path:
    """Write config.json, model.safetensors, tokenizer files (and a LoRA drafter) into `path`; the
    tokenizer is trained on `texts` (default: a few lines of prose and code), split by `split`."""
    from edge_dlm.model.weights import save_checkpoint

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = build_tokenizer(SAMPLE_TEXT * 4 if texts is None else texts, vocab_size, path, split=split)
    cfg = tiny_config(max(n, vocab_size), **config_kw)
    save_checkpoint(random_state(cfg, seed), cfg, path)
    if lora:
        write_lora(path, cfg, seed=seed + 1)
    return path
