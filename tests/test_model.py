"""The NLD model against the transformers reference (Ministral3ForCausalLM, tensors renamed)."""

from __future__ import annotations

import pytest
import torch

from edge_dlm.primitives.attention import CAUSAL
from edge_dlm.model.reference import to_transformers
from edge_dlm.model.testing import write_tiny_checkpoint
from edge_dlm.model.weights import load_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
def test_logits_match_transformers(tmp_path, kv_heads):
    # original_max=16: a 48-token prompt crosses it, so YaRN and the Llama-4 query scale both matter
    path = write_tiny_checkpoint(tmp_path / "c", heads=4, kv_heads=kv_heads, original_max=16, seed=kv_heads)
    ours, ref = load_model(path), to_transformers(path)
    ids = torch.randint(6, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids, torch.arange(48)[None])
        b = ref(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    # the Llama-4 scale is really exercised: it differs from 1 past position 16
    _, _, qs = ours.rope(torch.arange(48)[None], torch.float32)
    assert qs[0, 0, 15, 0] == 1 and qs[0, 0, 40, 0] > 1


def test_greedy_generation_equals_transformers(tiny_ckpt):
    import edge_dlm

    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    ref = to_transformers(tiny_ckpt)
    ids = rt.encode("The quick brown fox", raw=True)
    ours = rt.generate(ids, mode="ar", max_new_tokens=40)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                           pad_token_id=rt.config.eos_token_id)
    theirs = out[0, len(ids):].tolist()
    assert ours.output_ids == theirs[:len(ours.output_ids)]
    assert len(ours.output_ids) >= 20  # long enough to mean something (random weights rarely emit EOS)


def test_cached_decoding_equals_full_recomputation(tiny_model):
    ids = torch.randint(6, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tiny_model(ids, torch.arange(30)[None])[0]  # [30, V]
        cache = tiny_model.new_cache(30)
        steps = [tiny_model(ids[:, :10], torch.arange(10)[None], cache=cache, attn=CAUSAL)[0]]
        cache.commit(10)
        for i in range(10, 30):
            steps.append(tiny_model(ids[:, i:i + 1], torch.tensor([[i]]), cache=cache, attn=CAUSAL)[0])
            cache.commit(1)
    assert torch.allclose(torch.cat(steps), full, atol=1e-5)


def test_no_write_pass_leaves_cache_untouched(tiny_model):
    from edge_dlm.primitives.attention import BLOCK

    cache = tiny_model.new_cache(20)
    with torch.no_grad():
        tiny_model(torch.tensor([[7, 8, 9]]), torch.arange(3)[None], cache=cache, attn=CAUSAL)
        cache.commit(3)
        before = [t.clone() for t in cache.committed()]
        tiny_model(torch.tensor([[10, 3, 3, 3]]), torch.arange(3, 7)[None], cache=cache, attn=BLOCK)
        cache.commit(0)
    assert cache.length == 3
    for a, b in zip(before, cache.committed()):
        assert torch.equal(a, b)


def test_sharded_checkpoint_loads(tmp_path, tiny_ckpt):
    import json

    from safetensors.torch import load_file, save_file

    d = tmp_path / "sharded"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tiny_ckpt / f).read_bytes())
    state = load_file(tiny_ckpt / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in shards.items():
        save_file({n: state[n] for n in ns}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    a, b = load_model(d), load_model(tiny_ckpt)
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(a(x, torch.arange(3)[None]), b(x, torch.arange(3)[None]))


def test_unknown_config_keys_are_ignored(tmp_path):
    import json

    path = write_tiny_checkpoint(tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(ar_loss_weight=1.0, dlm_loss_weight=0.3, auto_map={"AutoModel": "x.Y"}, prefix_ratio=0.8)
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_model(path).config.mask_token_id == 3


def test_the_head_runs_only_where_logits_are_used(tiny_model):
    """A prefill's pass (and diffusion's commit pass) computes the output head for its last position
    only: the same logits as the full pass's last row, from a [1, 1, H] head input."""
    import torch

    from edge_dlm.primitives.attention import CAUSAL
    from helpers import run_mode

    ids = torch.tensor([list(range(5, 17))])
    pos = torch.arange(12)[None]
    with torch.inference_mode():
        full = tiny_model(ids, pos, cache=tiny_model.new_cache(16), attn=CAUSAL)
        last = tiny_model(ids, pos, cache=tiny_model.new_cache(16), attn=CAUSAL, last_only=True)
    assert last.shape == (1, 1, full.shape[-1]) and torch.allclose(last[0, 0], full[0, -1], atol=1e-5)
    widths = []
    hook = tiny_model.diffusion_head.register_forward_hook(
        lambda m, inp, out: widths.append(inp[0].numel() // inp[0].shape[-1]))  # rows the head ran for
    try:
        run_mode(tiny_model, list(range(5, 17)), "ar", max_new_tokens=3)
    finally:
        hook.remove()
    assert widths == [1, 1, 1]  # the 12-token prefill, then two AR steps: one row each


def test_cpu_auto_dtype_keeps_large_bf16_checkpoints(monkeypatch, tmp_path):
    """`--dtype auto` on a CPU: float32, except a bfloat16 checkpoint of `CPU_BF16_BYTES` or more (its
    weights stream from memory every pass); an explicit dtype and CUDA's bfloat16 are untouched."""
    import json
    import shutil

    from edge_dlm import runtime
    from edge_dlm.hub import DEMO_MODEL
    from edge_dlm.primitives import device

    cpu = torch.device("cpu")
    demo = DEMO_MODEL
    assert json.loads((demo / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert device.resolve_dtype("auto", cpu, demo) == torch.float32  # 6 MB: lives in cache
    monkeypatch.setattr(device, "CPU_BF16_BYTES", 1 << 20)
    assert device.resolve_dtype("auto", cpu, demo) == torch.bfloat16
    assert device.resolve_dtype(None, cpu, demo) == torch.bfloat16
    assert device.resolve_dtype("float32", cpu, demo) == torch.float32
    assert device.resolve_dtype("auto", torch.device("cuda"), demo) == torch.bfloat16
    f32 = tmp_path / "f32"
    shutil.copytree(demo, f32)
    cfg = json.loads((f32 / "config.json").read_text())
    (f32 / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    assert device.resolve_dtype("auto", cpu, f32) == torch.float32
    (f32 / "config.json").write_text("{not json")
    assert device.resolve_dtype("auto", cpu, f32) == torch.float32  # the loader reports a bad config
    rt = runtime.load(demo, device="cpu", compile="off")
    assert rt.dtype == torch.bfloat16 and rt.model.encoder.norm.weight.dtype == torch.bfloat16
