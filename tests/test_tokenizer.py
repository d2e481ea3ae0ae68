"""Tokenizer, chat template and the streaming detokenizer."""

from __future__ import annotations

import pytest

from edge_dlm.primitives.errors import UserError
from edge_dlm.primitives.tokenizer import StreamDetokenizer, Tokenizer


def test_chat_template_renders_and_encodes_specials(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<s>[INST]hi[/INST]"
    ids = tok.encode_prompt("hi")
    assert ids[0] == 1 and tok.token_to_id("[INST]") in ids and tok.token_to_id("[/INST]") == ids[-1]
    assert tok.encode_prompt("hi", raw=True)[0] == 1 and tok.token_to_id("[INST]") not in tok.encode_prompt("hi", raw=True)


def test_template_errors_are_user_errors(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    with pytest.raises(UserError, match="unknown role"):
        tok.render_chat([{"role": "robot", "content": "x"}])


def test_stream_detokenizer_matches_full_decode(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    text = "naïve café — 東京 def f(x):\n    return x  🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    det = StreamDetokenizer(tok)
    pieces = [det.push([i]) for i in ids] + [det.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
