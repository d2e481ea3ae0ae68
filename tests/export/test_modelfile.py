"""The Ollama Modelfile beside a GGUF export: its TEMPLATE, run by Go's text/template (what Ollama runs),
renders every conversation as the checkpoint's Jinja template does; a template that does not convert
exactly gets no TEMPLATE and says why."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_dlm import cli
from edge_dlm.export.modelfile import modelfile, pieces, probes
from edge_dlm.hub import DEMO_MODEL
from edge_dlm.primitives.tokenizer import Tokenizer

pytest.importorskip("gguf")
GO_MAIN = Path(__file__).with_name("gotemplate") / "main.go"

# a ChatML-style template with a generation prompt and newlines: linear
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral v1 style: the system message goes inside the first user turn: not one text per message
MERGED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}"
          "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}"
          "{% endif %}{% endfor %}")


def go_render(template: str, chats: list[list[dict]], tmp_path: Path) -> list[str]:
    if shutil.which("go") is None:
        pytest.skip("needs Go (golang-go; .ci/run installs it) to run Ollama's template engine")
    req = {"template": template, "chats": [[{"Role": m["role"], "Content": m["content"]} for m in c] for c in chats]}
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    run = subprocess.run(["go", "run", str(GO_MAIN)], input=json.dumps(req), capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def renderer(tmp_path: Path, template: str):
    d = tmp_path / "tok"
    shutil.copytree(DEMO_MODEL, d, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    tok = Tokenizer.from_dir(d)
    return lambda messages, agp: tok.render_chat(messages, add_generation_prompt=agp)


def template_of(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*)"""$', text, re.M | re.S).group(1)


def test_export_writes_a_modelfile_ollama_renders_as_edge_dlm(tmp_path):
    out = tmp_path / "demo.gguf"
    assert cli.main(["export", str(DEMO_MODEL), "-o", str(out), "--target", "gguf"]) == 0
    text = (tmp_path / "demo.Modelfile").read_text()
    assert "FROM ./demo.gguf" in text and 'PARAMETER stop "</s>"' in text
    tok = Tokenizer.from_dir(DEMO_MODEL)
    chats = probes()
    assert go_render(template_of(text), chats, tmp_path) == [tok.render_chat(c) for c in chats]


def test_a_template_with_a_generation_prompt_converts(tmp_path):
    render = renderer(tmp_path, CHATML)
    text, why = modelfile("m.gguf", render, ["<|im_end|>"])
    assert not why
    chats = probes()
    assert go_render(template_of(text), chats, tmp_path) == [render(c, True) for c in chats]


def test_a_template_that_is_not_one_text_per_message_gets_no_template(tmp_path):
    render = renderer(tmp_path, MERGED)
    p, why = pieces(render)
    assert p is None and "system" in why
    text, note = modelfile("m.gguf", render, ["</s>"])
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and note == why
    assert "FROM ./m.gguf" in text
