"""The exported GGUF in llama.cpp itself (its Python binding, which `make test` installs): it tokenizes a
corpus of 2,000+ strings to edge-dlm's ids, formats chats to edge-dlm's prompt, and computes edge-dlm's
logits, for the bundled demo model (GPT-2's split) and a tiny Tekken-style tokenizer built here."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_dlm import cli
from edge_dlm.hub import DEMO_MODEL
from edge_dlm.model.testing import SAMPLE_TEXT, write_tiny_checkpoint
from edge_dlm.model.weights import load_model
from edge_dlm.primitives.tokenizer import TEKKEN_REGEX, Tokenizer

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding (llama-cpp-python; make test installs it)")

PROBE = Path(__file__).with_name("llama_cpp_probe.py")
ROOT = Path(__file__).resolve().parents[2]

SCRIPTS = ["Ελληνικά γράμματα", "Кириллица и ЁЖИК", "中文分词测试", "日本語のテキスト、カタカナ", "한국어 문장입니다",
           "العربية مكتوبة", "हिन्दी देवनागरी", "ภาษาไทย", "עברית", "Ünïcödé ÀÉÎÕÜ àéîõü", "Straße STRASSE",
           "ǅungla ǈudi", "ŉ ǰ ΐ", "e\u0301 a\u0308 n\u0303", "ﬁ ﬂ ﬀ", "ℌℑℜ ⅷ Ⅻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "aÉb", "ÉcoleÉTÉ"]
EMOJI = ["🙂", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️", "🧑🏿‍💻", "✊🏻✊🏿", "🫠", "©️®️™️"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { s += a[i]; }", "if x != y:\n\tpass",
        "SELECT * FROM t WHERE id = 42;", "const o = {a: 1, 'b': [2, 3]};", "#include <stdio.h>", "x=>x*2",
        "fn main() { println!(\"{}\", 1); }", "<div class=\"a\">b</div>", "lambda: None", "a//b%c", "$HOME/.cache"]
PROSE = ["The quick brown fox jumps over the lazy dog.", "Don't stop; it's what we'll do, isn't it?",
         "I'm sure they've gone.", "HTTPServer and XMLHttpRequest", "CamelCaseWordsHere", "ALL CAPS TEXT",
         "mixedCASE wOrDs", "e.g. i.e. etc.", "“curly quotes” and ‘single’", "em—dash – en dash"]
SPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t  \n", "    indented", "trailing   ", "a  b   c",
         "\u00a0", "\u3000", "\u2003x", "line\n\n\nline"]
DIGITS = ["0", "7", "42", "1234567890", "3.14159", "1,000,000", "2026-12-04", "0x1F", "1e-9", "½ ¾", "٣٤٥", "१२३",
          "x2y3", "v1.2.3"]
SPECIAL = ["<s>", "</s>", "<mask>", "<unk>", "[INST]", "[/INST]", "<s >", "< s>", "[INST ]", "[ INST]", "<<s>>",
           "[/INST]x", "x[INST]", "</s></s>", "<s>hi</s>", "[INST]q[/INST]a</s>", "<mask><mask>", "<sys>", "[/inst]"]
FAMILIES = [SCRIPTS, EMOJI, CODE, PROSE, SPACE, DIGITS, SPECIAL]


def corpus(n: int = 2100) -> list[str]:
    """Every fragment alone, then seeded joins of 1-4 fragments from any families (with and without
    spaces between them): at least n strings, the same every run."""
    rng = random.Random(0)
    out = [f for family in FAMILIES for f in family]
    while len(out) < n:
        parts = [rng.choice(rng.choice(FAMILIES)) for _ in range(rng.randint(1, 4))]
        out.append(rng.choice(["", " ", "\n"]).join(parts))
    return out


def probe(request: dict) -> dict:
    run = subprocess.run([sys.executable, str(PROBE)], input=json.dumps(request), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def export(src: Path, out: Path, *args: str) -> Path:
    assert cli.main(["export", str(src), "-o", str(out), "--target", "gguf", *args]) == 0
    return out


@pytest.fixture(scope="module")
def tekken_ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint whose tokenizer splits as Tekken's does, trained on the corpus's own families
    (so its merges reach across the places the two regexes could split differently)."""
    texts = SAMPLE_TEXT * 4 + [" ".join(f) for f in FAMILIES] * 8 + corpus(600)[::3]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tekken") / "ckpt", split=TEKKEN_REGEX, texts=texts,
                                 vocab_size=1200)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tekken_ckpt) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("gguf")
    return {"demo": (DEMO_MODEL, export(DEMO_MODEL, d / "demo.gguf")),
            "tekken": (tekken_ckpt, export(tekken_ckpt, d / "tekken.gguf", "--dtype", "float32"))}


def mismatches(src: Path, gguf_path: Path, texts: list[str]) -> list[tuple[str, list[int], list[int]]]:
    tok = Tokenizer.from_dir(src)
    theirs = probe({"gguf": str(gguf_path), "texts": texts})["ids"]
    return [(t, ours, th) for t, th in zip(texts, theirs) if (ours := tok.encode(t, add_special_tokens=False)) != th]


def test_llama_cpp_tokenizes_the_demo_model_as_edge_dlm_does(exported):
    """GPT-2's split (the demo model's): every string of the corpus, the same ids."""
    from edge_dlm.export.gguf import read_back

    src, path = exported["demo"]
    assert read_back(path)["meta"]["tokenizer.ggml.pre"] == "gpt-2"
    texts = corpus()
    bad = mismatches(src, path, texts)
    assert not bad, f"{len(bad)} of {len(texts)} strings tokenize differently, e.g. {bad[:3]}"


def test_llama_cpp_tokenizes_tekken_as_edge_dlm_does_outside_its_known_gap(exported):
    """Tekken's split: llama.cpp's `tekken` regex approximates the letter classes (export.gguf.GAPS).
    Every corpus string outside that class (2,000+) gets the same ids; every difference lies inside it
    (a difference anywhere else fails), and the gap is real (this test would notice llama.cpp closing it)."""
    from edge_dlm.export.gguf import read_back, tekken_gap

    src, path = exported["tekken"]
    assert read_back(path)["meta"]["tokenizer.ggml.pre"] == "tekken"
    texts = corpus(2900)
    outside = [t for t in texts if not tekken_gap(t)]
    assert len(outside) >= 2000
    bad = mismatches(src, path, texts)
    assert not [b for b in bad if not tekken_gap(b[0])], [b for b in bad if not tekken_gap(b[0])][:3]
    assert bad, "llama.cpp now splits like Tekken everywhere: drop the gap (export.gguf.GAPS)"


def test_the_old_default_pre_tokenizer_is_caught(tmp_path, monkeypatch):
    """The exporter before this check wrote `tokenizer.ggml.pre = default`: the corpus finds it."""
    from edge_dlm.export import gguf as exporter

    monkeypatch.setattr(exporter, "pre_type", lambda tok: "default")
    path = export(DEMO_MODEL, tmp_path / "old.gguf")
    bad = mismatches(DEMO_MODEL, path, corpus())
    assert len(bad) > 20, len(bad)


CHATS = [[{"role": "user", "content": "Hello!"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
         [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "3"}],
         [{"role": "user", "content": ""}],
         [{"role": "system", "content": ""}, {"role": "user", "content": "x\n\ny"},
          {"role": "assistant", "content": ""}, {"role": "user", "content": "Ünïcödé 🙂 <s>"}]]


def test_llama_cpp_formats_chats_as_edge_dlm_does(exported):
    """The chat template llama.cpp reads from the file (its Jinja path: llama-cpp-python's chat
    completion, llama-server --jinja) renders each conversation to edge-dlm's prompt, token for token."""
    src, path = exported["demo"]
    tok = Tokenizer.from_dir(src)
    got = probe({"gguf": str(path), "chats": CHATS})
    for chat, prompt, ids in zip(CHATS, got["jinja"], got["jinja_ids"]):
        assert prompt == tok.render_chat(chat)
        assert ids == tok.encode_prompt(chat)


def test_bf16_logits_match(exported, tmp_path):
    """llama.cpp's logits on the BF16 file against edge-dlm's pass on the same bf16-rounded weights (the
    tiny Tekken checkpoint: YaRN and the Llama-4 query scale active past 16 positions)."""
    src, _ = exported["tekken"]
    path = export(src, tmp_path / "bf16.gguf", "--dtype", "bfloat16")
    ids = [1] + [int(x) for x in torch.randint(6, 1000, (47,), generator=torch.Generator().manual_seed(3))]
    theirs = torch.tensor(probe({"gguf": str(path), "logits": ids})["logits"])
    model = load_model(src)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the file's weights; activations stay float32 on both sides
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    # llama.cpp also rounds the activations to bf16 before a BF16 matmul (edge-dlm's CPU pass keeps them
    # float32): the stated tolerance is 3% of the logits' spread per position, and the same top token
    err = ((theirs - ours).abs().amax(-1) / (ours.amax(-1) - ours.amin(-1))).max().item()
    print(f"bf16: largest difference {err:.4f} of a position's logit spread")
    assert err <= 0.03
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("quant,fmt", [("int8", "Q8_0"), ("int4", "Q4_0")])
def test_quantized_files_continue_as_edge_dlm_does(exported, tmp_path, quant, fmt):
    """Q8_0 / Q4_0 of the demo model hold edge-dlm's int8 / int4 (group 32) weights: greedy continuations
    of 64 tokens from 10 prompts in llama.cpp equal edge-dlm's for at least 7 (8 of 10 measured; llama.cpp
    rounds activations to 8 bits, so a near-tie can part them: scripts/eval_gguf_agreement.py)."""
    import edge_dlm

    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_gguf_agreement", ROOT / "scripts" / "eval_gguf_agreement.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # its prompts: the test and the recorded run ask the same
    tok = Tokenizer.from_dir(DEMO_MODEL)
    ids = [tok.encode(p) for p in script.PROMPTS]
    path = export(DEMO_MODEL, tmp_path / f"{fmt}.gguf", "--quant", quant)
    theirs = probe({"gguf": str(path), "greedy": ids, "n": 64})["greedy"]
    rt = edge_dlm.load(str(DEMO_MODEL), dtype="float32", engine="torch", quant=quant, group_size=32)
    ours = [rt.generate(i, mode="ar", max_new_tokens=64, ignore_eos=True).output_ids for i in ids]
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= 7, (same, [(a[:8], b[:8]) for a, b in zip(ours, theirs) if a != b])
