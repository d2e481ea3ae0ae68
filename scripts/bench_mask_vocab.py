"""The grammar mask's cost per pass at NLD's vocabulary size (131072 tokens), for the 3B-shape ratio.

    .venv/bin/python scripts/bench_mask_vocab.py [--vocab 131072] [--out bench_results/mask_vocab.json]

No NLD tokenizer is bundled (nothing is downloaded), so the vocabulary is built here: the 256 byte
tokens, then byte-level tokens cut from Python's own standard library sources (identifiers, words,
punctuation runs, each with and without a leading space: the kind of strings a code-and-prose BPE
vocabulary holds), up to --vocab tokens. llguidance's mask cost depends on the vocabulary's token trie,
not on merges, so the tokenizer has none. For each of the structured-output benchmark's JSON schemas,
a valid answer is walked token by token through edge-dlm's `Constraint` (what every mode calls once
per picked row), timing each mask; the median over schemas and tokens is the cost per AR pass.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table() -> dict[int, str]:
    """GPT-2's byte-to-character table (how byte-level BPE vocabularies write tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TABLE = _table()


def byte_level(text: str) -> str:
    return "".join(TABLE[b] for b in text.encode("utf-8"))


def vocabulary(size: int) -> list[str]:
    from tokenizers import pre_tokenizers

    out = list(dict.fromkeys(pre_tokenizers.ByteLevel.alphabet()))
    seen = set(out)
    lib = Path(sysconfig.get_paths()["stdlib"])
    pieces: dict[str, None] = {}
    for f in sorted(lib.rglob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for piece in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d{1,3}|[^\sA-Za-z0-9_]{1,4}", text):
            pieces[piece] = None
            pieces[" " + piece] = None
            if len(piece) > 5:
                pieces[piece[: len(piece) // 2]] = None
        if len(pieces) > 2 * size:
            break
    for cand in pieces:
        if (t := byte_level(cand)) not in seen:
            seen.add(t)
            out.append(t)
            if len(out) >= size:
                break
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--out", default=str(ROOT / "bench_results" / "mask_vocab.json"))
    a = p.parse_args()
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edge_dlm.decoding.controls import Constraint, _allowed, matcher
    from edge_dlm.primitives.tokenizer import Tokenizer as EdgeTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_controls import SCHEMAS  # the structured-output benchmark's schemas

    vocab = vocabulary(a.vocab)
    specials = ["<unk>", "<s>", "</s>", "<mask>"]
    vocab = specials + [t for t in vocab if t not in specials]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    with tempfile.TemporaryDirectory() as d:
        tok.save(str(Path(d) / "tokenizer.json"))
        (Path(d) / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        et = EdgeTokenizer.from_dir(d)
    answers = [{"name": "Tom", "age": 7}, {"tags": ["red", "blue"]}, {"point": {"x": 1.5, "y": 3}, "label": "a"},
               {"ok": True, "level": "mid"}, {"items": [{"id": 4, "note": "hi"}]}]
    times = []
    for schema, answer in zip(SCHEMAS, answers):
        m = matcher(Constraint("json_schema", json.dumps(schema)), et, len(vocab), 2)
        for t in et.encode(json.dumps(answer, separators=(", ", ": ")), add_special_tokens=False):
            t0 = time.perf_counter()
            allowed = _allowed(m, len(vocab))  # what a pick reads: the mask as a bool tensor
            times.append(time.perf_counter() - t0)
            assert bool(allowed[t]) and m.consume_token(t), "the answer is not valid under its schema"
    ms = 1e3 * statistics.median(times)
    from benchlib import record

    result = {"vocab": len(vocab),
              "masks": len(times), "median_ms_per_mask": round(ms, 3),
              "p90_ms_per_mask": round(1e3 * sorted(times)[int(0.9 * len(times))], 3)}
    print(result)
    record(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
