"""The demo model: its recipe still trains, and the bundled checkpoint works in every mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_recipe_trains_a_few_steps(tmp_path):
    train_demo = load_script("train_demo")
    out = tmp_path / "model"
    assert train_demo.main(["--out", str(out), "--work", str(tmp_path / "work"), "--max-files", "6",
                            "--steps", "2", "--batch", "2", "--seq-len", "64"]) == 0
    info = json.loads((tmp_path / "work" / "train_info.json").read_text())
    assert info["steps"] == 2 and info["tokens_seen"] == 2 * 2 * 64
    import edge_dlm

    rt = edge_dlm.load(out, device="cpu")
    assert rt.config.block_size == 16 and rt.tokenizer.chat_template
    r = rt.generate("def f(x):", raw=True, mode="linear-spec", max_new_tokens=4)
    assert r.nfe >= 3


def test_chat_pairs_come_from_docstrings():
    train_demo = load_script("train_demo")
    src = '"""A module that adds numbers together, for testing the recipe."""\n\n' \
          'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n'
    pairs = train_demo.chat_pairs(src, "adder")
    assert ("What is the Python module adder for?", "A module that adds numbers together, for testing the recipe.") in pairs
    assert any(q.startswith("Write a Python function add(a, b). Return the sum") and "return a + b" in a
               for q, a in pairs)


DEMO = ROOT / "edge_dlm" / "demo_model"


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not bundled yet")
@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_bundled_demo_model_generates_in_every_mode(mode):
    import edge_dlm

    rt = edge_dlm.load(device="cpu")
    assert rt.path == DEMO
    r = rt.generate("Write a Python function is_even(n). Return True if n is even.", mode=mode,
                    max_new_tokens=24, steps=4 if mode == "diffusion" else None)
    assert r.output_ids and rt.config.mask_token_id not in r.output_ids
    assert r.text.strip()


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not bundled yet")
def test_bundled_demo_model_is_small_and_documented():
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total <= 24 * 1024 * 1024
    card = (DEMO / "README.md").read_text()
    assert "perplexity" in card.lower() and "| linear-spec |" in card
