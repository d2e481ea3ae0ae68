#!/usr/bin/env python3
"""Train the bundled demo model: a small NLD-architecture model in the exact NLD checkpoint format.

Recipe (config in scripts/demo_recipe.json):
  1. Corpus from text every machine has offline: the CPython standard library source (tests
     excluded). Every `holdout_every`-th file (by a hash of its path) is held out for evaluation.
  2. Instruction pairs in the chat template, built from the same files: a function's signature and
     docstring asking for the function, the function as the answer; a module name asking what it is
     for, its docstring as the answer.
  3. A byte-level BPE tokenizer (special tokens bos/eos/mask/[INST]/[/INST]).
  4. The joint AR + masked-diffusion objective of NLD (edge_dlm.model.training), AdamW, cosine decay,
     for a wall-clock budget.
  5. The checkpoint (config.json, model.safetensors, tokenizer files) is written atomically.

    .venv/bin/python scripts/train_demo.py --out edge_dlm/demo_model [--minutes 60]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_dlm.primitives.fsutil import atomic_dir  # noqa: E402
from edge_dlm.model.nld import NLDModel  # noqa: E402
from edge_dlm.model.testing import build_tokenizer, tiny_config  # noqa: E402
from edge_dlm.primitives.tokenizer import Tokenizer  # noqa: E402
from edge_dlm.model.training import init_weights, train  # noqa: E402
from edge_dlm.model.weights import save_checkpoint  # noqa: E402

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_files(max_files: int | None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    return files[:max_files] if max_files else files


def is_held_out(path: Path, every: int) -> bool:
    return int(hashlib.sha1(path.name.encode() + str(path.parent.name).encode()).hexdigest(), 16) % every == 0


def chat_pairs(source: str, module: str) -> list[tuple[str, str]]:
    """(request, answer) pairs from one source file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) > 40:
        pairs.append((f"What is the Python module {module} for?", doc.split("\n\n")[0].strip()))
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            fdoc = ast.get_docstring(node)
            if not fdoc or node.end_lineno - node.lineno > 40:
                continue
            body = "\n".join(lines[node.lineno - 1:node.end_lineno])
            indent = len(body) - len(body.lstrip())
            body = "\n".join(line[indent:] for line in body.splitlines())
            args = ", ".join(a.arg for a in node.args.args)
            ask = f"Write a Python function {node.name}({args}). {fdoc.splitlines()[0].strip()}"
            pairs.append((ask, body))
    return pairs


def build_corpus(cfg: dict) -> tuple[list[str], list[str], list[list[dict]]]:
    """(train texts, held-out texts, chat conversations from the training files)."""
    c = cfg["corpus"]
    train_docs, test_docs, chats = [], [], []
    for path in stdlib_files(c["max_files"]):
        try:
            text = path.read_text(encoding="utf-8")[:c["max_file_chars"]]
        except (UnicodeDecodeError, OSError):
            continue
        if is_held_out(path, c["holdout_every"]):
            test_docs.append(text)
            continue
        train_docs.append(text)
        for ask, answer in chat_pairs(text, path.stem):
            chats.append([{"role": "user", "content": ask}, {"role": "assistant", "content": answer}])
    return train_docs, test_docs, chats


def token_stream(tok: Tokenizer, docs: list[str], chats: list[list[dict]], chat_fraction: float,
                 seed: int) -> np.ndarray:
    """All documents (bos ... eos) and conversations (chat template), shuffled, as one uint16 stream."""
    eos = tok.token_to_id("</s>")
    pieces = [tok.encode(d) + [eos] for d in docs]
    doc_tokens = sum(map(len, pieces))
    rng = random.Random(seed)
    rng.shuffle(chats)
    chat_budget = doc_tokens * chat_fraction / (1 - chat_fraction)
    n = 0
    for conv in chats:
        ids = tok.encode(tok.render_chat(conv, add_generation_prompt=False), add_special_tokens=False)
        pieces.append(ids)
        n += len(ids)
        if n > chat_budget:
            break
    rng.shuffle(pieces)
    return np.fromiter((t for p in pieces for t in p), dtype=np.uint16)


def batches(stream: np.ndarray, seq_len: int, batch: int, seed: int):
    g = np.random.default_rng(seed)
    while True:
        starts = g.integers(0, len(stream) - seq_len - 1, size=batch)
        yield torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def write_model(model: NLDModel, tok_dir: Path, out: Path, dtype: torch.dtype, card: str | None) -> None:
    with atomic_dir(out, force=True) as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / name).write_bytes((tok_dir / name).read_bytes())
        cfg = model.config
        import dataclasses
        save_checkpoint(model, dataclasses.replace(cfg, torch_dtype=str(dtype).removeprefix("torch.")),
                        tmp, dtype=dtype)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "scripts" / "demo_recipe.json"))
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--work", default=str(ROOT / "runs" / "demo"), help="tokenizer, token files, snapshots")
    ap.add_argument("--minutes", type=float, help="override the training time budget")
    ap.add_argument("--steps", type=int, help="override the step count")
    ap.add_argument("--max-files", type=int, help="use only the first N stdlib files (for tests)")
    ap.add_argument("--batch", type=int, help="override the batch size")
    ap.add_argument("--seq-len", type=int, help="override the sequence length")
    ap.add_argument("--tokens-only", action="store_true", help="build tokenizer + token files, then stop")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text())
    if a.minutes is not None:
        cfg["train"]["minutes"] = a.minutes
    if a.steps is not None:
        cfg["train"]["steps"] = a.steps
    if a.batch is not None:
        cfg["train"]["batch"] = a.batch
    if a.seq_len is not None:
        cfg["train"]["seq_len"] = a.seq_len
    if a.max_files is not None:
        cfg["corpus"]["max_files"] = a.max_files
    if a.threads:
        torch.set_num_threads(a.threads)
    seed = cfg["seed"]
    torch.manual_seed(seed)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    train_docs, test_docs, chats = build_corpus(cfg)
    print(f"corpus: {len(train_docs)} train files, {len(test_docs)} held out, {len(chats)} chat pairs "
          f"({time.time() - t0:.1f}s)", flush=True)
    tok_dir = work / "tokenizer"
    sample = "".join(train_docs)[:cfg["tokenizer"]["train_chars"]]
    vocab = build_tokenizer([sample[i:i + 4096] for i in range(0, len(sample), 4096)],
                            cfg["tokenizer"]["vocab_size"], tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    train_stream = token_stream(tok, train_docs, chats, cfg["corpus"]["chat_fraction"], seed)
    test_stream = token_stream(tok, test_docs, [], 0.0, seed)
    np.save(work / "train_tokens.npy", train_stream)
    np.save(work / "test_tokens.npy", test_stream)
    (work / "test_files.json").write_text(json.dumps(len(test_docs)))
    print(f"tokens: {len(train_stream)} train, {len(test_stream)} held out, vocab {vocab} "
          f"({time.time() - t0:.1f}s)", flush=True)
    if a.tokens_only:
        return 0

    m = cfg["model"]
    mcfg = tiny_config(vocab, hidden=m["hidden"], layers=m["layers"], heads=m["heads"],
                       kv_heads=m["kv_heads"], head_dim=m["head_dim"], intermediate=m["intermediate"],
                       block_size=m["block_size"], max_positions=m["max_positions"],
                       original_max=m["original_max"])
    model = NLDModel(mcfg)
    init_weights(model, seed)
    t = cfg["train"]
    save_dtype = getattr(torch, cfg["save_dtype"])
    last_snap = [time.time()]

    def log(step: int, loss: float, stats: dict) -> None:
        if step % 25 == 0:
            print(f"step {step} loss {loss:.3f} ar_ce {stats['ar_ce']:.3f} dlm_ce {stats['dlm_ce']:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if time.time() - last_snap[0] > 60 * t["checkpoint_minutes"]:
            write_model(model, tok_dir, work / "snapshot", save_dtype, None)
            model.train()
            last_snap[0] = time.time()

    ran = train(model, batches(train_stream, t["seq_len"], t["batch"], seed), steps=t["steps"],
                lr=t["lr"], warmup=t["warmup"], w_dlm=t["w_dlm"], w_ar=t["w_ar"], seed=seed,
                time_budget_s=60 * t["minutes"], log=log)
    info = {"steps": ran, "tokens_seen": ran * t["batch"] * t["seq_len"], "batch": t["batch"],
            "seq_len": t["seq_len"],
            "train_minutes": round((time.time() - t0) / 60, 1), "train_tokens": int(len(train_stream)),
            "held_out_tokens": int(len(test_stream)), "params": sum(p.numel() for p in model.parameters())}
    (work / "train_info.json").write_text(json.dumps(info, indent=2))
    write_model(model, tok_dir, Path(a.out), save_dtype, None)
    print(f"wrote {a.out}: {info}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
