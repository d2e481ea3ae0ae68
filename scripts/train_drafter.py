"""Train the LinearSpec LoRA drafter of a checkpoint by self-distillation, base weights frozen.

LinearSpec accepts a draft token only while it equals the verifier's greedy pick, so the drafter is
trained on exactly that target: for contexts from the demo recipe's training text, the model's own
greedy AR continuation g[0..B-1] is computed (batched, no cache), and the draft pass
`[context | g[0], M x (B-1)]` (context causal, the block seeing the context and itself, as the
LinearSpec draft pass attends) is trained with cross-entropy at the masks against g[1..B-1]. Only the
`o_proj` LoRA (PEFT format, `linear_spec_lora/`) learns, so AR, diffusion and every lossless output
are unchanged; only drafts (and hence the accepted length) change.

    .venv/bin/python scripts/train_drafter.py --model edge_dlm/demo_model --minutes 20 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import edge_dlm  # noqa: E402
from edge_dlm.model.testing import write_lora  # noqa: E402
from edge_dlm.model.weights import load_model  # noqa: E402
from train_demo import build_corpus, token_stream  # noqa: E402


def draft_mask(c: int, b: int) -> torch.Tensor:
    """[c+b, c+b] bool: the context causal, the block sees the context and the whole block."""
    n = c + b
    m = torch.ones(n, n, dtype=torch.bool).tril()
    m[c:, :] = True
    return m


@torch.no_grad()
def greedy_continuations(model, ctx: torch.Tensor, b: int, mask_id: int) -> torch.Tensor:
    """`ctx [N, C]` -> the model's greedy AR continuation `[N, b]` (mask id excluded)."""
    seq = ctx
    for _ in range(b):
        h = model.hidden(seq, torch.arange(seq.shape[1])[None].expand(seq.shape[0], -1))
        logits = model.diffusion_head(h[:, -1]).float()  # the head on the last position only
        logits[:, mask_id] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, ctx.shape[1]:]


def acceptance(model_dir: Path, prompts: list[str], tokens: int) -> float:
    rt = edge_dlm.load(model_dir, device="cpu", engine="torch")
    acc = [rt.generate(p, raw=True, mode="linear-spec", max_new_tokens=tokens).mean_accepted for p in prompts]
    return statistics.mean(acc)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "edge_dlm" / "demo_model"))
    ap.add_argument("--out", required=True, help="where to write linear_spec_lora/ (e.g. the model directory)")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    rnd = random.Random(a.seed)
    src = Path(a.model)
    model = load_model(src, lora=False)
    cfg = model.config
    b, mask_id = cfg.block_size, cfg.mask_token_id
    recipe = json.loads((ROOT / "scripts" / "demo_recipe.json").read_text())
    train_docs, _, _ = build_corpus(recipe)
    tok = edge_dlm.load(src, device="cpu", engine="torch").tokenizer
    stream = token_stream(tok, train_docs[: len(train_docs) // 2], [], 0.0, a.seed)
    print(f"{len(stream)} training tokens", flush=True)
    q = cfg.num_attention_heads * cfg.head_dim
    lora_a = [torch.nn.Parameter(torch.randn(a.rank, q) / math.sqrt(q)) for _ in model.encoder.layers]
    lora_b = [torch.nn.Parameter(torch.zeros(cfg.hidden_size, a.rank)) for _ in model.encoder.layers]
    scale = a.alpha / a.rank
    for layer, la, lb in zip(model.encoder.layers, lora_a, lora_b):
        layer.self_attn.o_lora = (la, lb, scale)
    opt = torch.optim.AdamW(lora_a + lora_b, lr=a.lr, weight_decay=0.0)
    deadline = time.time() + a.minutes * 60
    step, losses = 0, []
    while time.time() < deadline:
        c = rnd.choice([16, 32, 48])
        starts = np.array([rnd.randrange(0, len(stream) - c) for _ in range(a.batch)])
        ctx = torch.from_numpy(np.stack([stream[s:s + c] for s in starts]).astype(np.int64))
        g = greedy_continuations(model, ctx, b, mask_id)  # the verifier's picks; no LoRA here
        x = torch.cat([ctx, g[:, :1], torch.full((a.batch, b - 1), mask_id)], dim=1)
        pos = torch.arange(c + b)[None].expand(a.batch, -1)
        logits = model(x, pos, mask=draft_mask(c, b), use_lora=True)[:, c + 1:]  # [N, b-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), g[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {statistics.mean(losses[-50:]):.3f} "
                  f"({(deadline - time.time()) / 60:.1f} min left)", flush=True)
    state = {}
    for i, (la, lb) in enumerate(zip(lora_a, lora_b)):
        key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_"
        state[key + "A.weight"] = la.detach().to(torch.bfloat16)
        state[key + "B.weight"] = lb.detach().to(torch.bfloat16)
    write_lora(Path(a.out), cfg, r=a.rank, alpha=a.alpha, state=state)
    info = {"steps": step, "batch": a.batch, "rank": a.rank, "alpha": a.alpha, "lr": a.lr,
            "minutes": a.minutes, "final_loss": statistics.mean(losses[-50:]) if losses else None}
    (Path(a.out) / "linear_spec_lora" / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
