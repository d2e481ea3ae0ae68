"""Fill in the middle and edit in place (docs/infill.md): known tokens, masks, NFE, windows, EOS, errors."""

from __future__ import annotations

import json

import pytest
import torch

import edge_dlm
from edge_dlm import Canvas, Done, cli
from edge_dlm.decoding.infill import token_spans
from edge_dlm.primitives.attention import CAUSAL
from edge_dlm.primitives.errors import UserError

PREFIX = [1, 40, 41, 42, 43, 44]
SUFFIX = [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]


class Recording:
    """The runtime's model, recording each pass (tokens, first position, causal or not)."""

    picks_in_pass = False  # it edits logits: the decoder must pick from them

    def __init__(self, model, eos_at: int | None = None) -> None:
        self.model, self.passes, self.eos_at = model, [], eos_at

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, positions, *, cache, attn, use_lora=False, last_only=False):
        self.passes.append((tokens[0].tolist(), int(positions[0, 0]), attn is CAUSAL or attn.kind == "causal"))
        logits = self.model(tokens, positions, cache=cache, attn=attn, use_lora=use_lora, last_only=last_only)
        if self.eos_at is not None and attn.kind == "block":  # make one absolute position certain to be EOS
            rel = self.eos_at - int(positions[0, 0])
            if 0 <= rel < tokens.shape[1]:
                logits[0, rel, self.model.config.eos_token_id] = 1e4
        return logits


@pytest.fixture()
def rt(tiny_ckpt):
    rt = edge_dlm.load(tiny_ckpt, device="cpu", dtype="float32")
    rt.model = Recording(rt.model)
    return rt


def stream(rt, *args, method="infill_stream", **kw):
    events = list(getattr(rt, method)(*args, **kw))
    return [e for e in events if isinstance(e, Canvas)], events[-1].result


@pytest.mark.parametrize("n,steps", [(1, 1), (3, 1), (3, 2), (3, 3), (4, 2), (2, 4)])
def test_known_tokens_never_change_and_nfe_is_exact(rt, n, steps):
    b = rt.config.block_size  # 4
    mask = rt.config.mask_token_id
    canvases, res = stream(rt, PREFIX, SUFFIX, length=n, steps=steps, threshold=1.0)
    known = {j: t for j, t in enumerate([mask] * n + SUFFIX[:b - n]) if t != mask}
    previous = [mask] * n + SUFFIX[:b - n]
    for c in canvases:
        assert all(c.tokens[j] == t for j, t in known.items())  # known tokens never change
        assert all(previous[j] == mask for j in c.committed)  # only masks are written
        assert all(c.tokens[j] != mask for j in c.committed)  # and never with the mask id
        previous = c.tokens
    assert mask not in res.output_ids
    causal = [p for p in rt.model.passes if p[2]]
    assert causal == [(PREFIX, 0, True)]  # one prefill of the prefix
    assert res.nfe == 1 + len(canvases)
    if res.finish_reason == "length":
        assert len(res.output_ids) == n and len(canvases) == min(steps, n)  # tau = 1: the k rule alone
    for tokens, pos, is_causal in rt.model.passes[1:]:
        assert not is_causal and pos == len(PREFIX) and tokens[n:] == SUFFIX[:b - n]


def test_zero_length_fill_runs_no_pass(rt):
    canvases, res = stream(rt, PREFIX, SUFFIX, length=0)
    assert res.nfe == 0 and res.output_ids == [] and res.text == "" and not canvases and not rt.model.passes


def test_block_size_one(rt):
    canvases, res = stream(rt, PREFIX, SUFFIX, length=1, block_size=1)
    assert res.nfe == 2 and len(res.output_ids) <= 1 and len(canvases) == 1
    assert rt.model.passes[1][0][0] == rt.config.mask_token_id and len(rt.model.passes[1][0]) == 1  # no suffix fits


def test_suffix_beyond_the_window_is_not_seen(rt):
    b, n = rt.config.block_size, 2
    a = rt.infill(PREFIX, SUFFIX, length=n, steps=2)
    other = SUFFIX[:b - n] + [7, 8, 9, 10, 11]  # same visible part, different rest
    assert rt.infill(PREFIX, other, length=n, steps=2).output_ids == a.output_ids
    assert all(len(p[0]) == b for p in rt.model.passes if not p[2])  # each block pass is one full window


def test_eos_cuts_the_fill(rt):
    rt.model.eos_at = len(PREFIX) + 1  # the second fill position becomes EOS
    canvases, res = stream(rt, PREFIX, SUFFIX, length=4, steps=4, threshold=1.0)
    assert res.finish_reason == "stop" and len(res.output_ids) == 1
    # denoising stops once no mask is left before the EOS: EOS is the most confident, then position 0
    assert len(canvases) == 2 and res.nfe == 3


def test_chosen_length_shares_the_prefill(rt):
    canvases, res = stream(rt, PREFIX, SUFFIX, max_length=3, steps=2)
    assert [p for p in rt.model.passes if p[2]] == [(PREFIX, 0, True)]
    assert res.nfe == 1 + len(canvases) and 1 <= len(res.output_ids) <= 3
    assert [len(p[0]) for p in rt.model.passes if not p[2]] == [4] * len(canvases)


def test_sampled_fill_is_reproducible(rt):
    a = rt.infill(PREFIX, SUFFIX, length=3, temperature=1.0, seed=7)
    assert rt.infill(PREFIX, SUFFIX, length=3, temperature=1.0, seed=7).output_ids == a.output_ids


def test_edit_keeps_everything_outside_its_spans(rt):
    text = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
    spans = [(text.index("a + b"), text.index("a + b") + 5), (text.index("sub"), text.index("sub") + 3),
             (len(text) - 6, len(text) - 1)]
    canvases, res = stream(rt, text, spans, method="edit_stream", steps=2)
    ids, offsets = rt.tokenizer.encode_offsets(text)
    masked = {i for i, o in enumerate(offsets) if o and any(o[1] > a and o[0] < b for a, b in spans)}
    assert len(masked) > 3
    if res.finish_reason == "stop" and len(res.output_ids) == len(ids):
        assert [t for i, t in enumerate(res.output_ids) if i not in masked] == \
            [t for i, t in enumerate(ids) if i not in masked]
    first = min(masked)
    assert text.startswith(res.text[:offsets[first][0]]) and res.text[:offsets[first][0]] == text[:offsets[first][0]]
    last = max(masked)
    assert res.text.endswith(text[offsets[last][1]:])
    mask = rt.config.mask_token_id
    assert mask not in res.output_ids and all(mask not in c.tokens or c.tokens.count(mask) < 5 for c in canvases)
    causal = sum(p[2] for p in rt.model.passes)
    assert res.nfe == causal + len(canvases)
    assert rt.model.passes[0] == (ids[:first], 0, True)


@pytest.mark.parametrize("text", [
    "- budget approved\n- travel pending\n",
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value\n",
    "Caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9s, \u00fcber\ttabs  and  doubled  spaces.",
])
def test_edit_keeps_every_byte_outside_its_span_on_random_spans(tiny_ckpt, text):
    """1000 random spans over three texts (inside words, on token boundaries, with leading spaces):
    the text outside each span comes back byte for byte."""
    import random

    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    rng = random.Random(len(text))
    ids, offsets = rt.tokenizer.encode_offsets(text)
    starts = sorted(({o[0] for o in offsets if o} | {o[1] for o in offsets if o}) - {len(text)})  # token edges
    done = 0
    while done < 334:
        c0 = rng.choice(starts) if rng.random() < 0.4 else rng.randrange(len(text) - 1)
        c1 = min(len(text), c0 + rng.randint(1, 6))
        try:
            res = rt.edit(text, [(c0, c1)], steps=1, temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(1 << 30))
        except UserError as exc:  # a span over more tokens than the window: refused, not cut
            assert "at most 4" in str(exc), exc
            continue
        assert res.text.startswith(text[:c0]), (c0, c1, res.text)
        assert res.text.endswith(text[c1:]), (c0, c1, res.text)
        assert len(res.text) >= len(text) - (c1 - c0) and res.text.encode("utf-8")  # whole characters
        done += 1


def test_edit_spans_are_whole_tokens_and_can_merge(rt):
    text = "x = 1 + 2"
    ids, offsets = rt.tokenizer.encode_offsets(text)
    assert token_spans(text, [(4, 5), (4, 6)], offsets, 4) == token_spans(text, [(4, 6)], offsets, 4)


@pytest.mark.parametrize("call,match", [
    (lambda rt: rt.edit("", [(0, 1)]), "the text to edit is empty"),
    (lambda rt: rt.edit("x = 1", []), "at least one span"),
    (lambda rt: rt.edit("x = 1", [(3, 3)]), "is not inside the text"),
    (lambda rt: rt.edit("x = 1", [(2, 99)]), "is not inside the text (0..5)"),
    (lambda rt: rt.edit("x = 1", [(1, "2")]), "two character offsets"),
    (lambda rt: rt.edit("x = 1 + 2 + 3 + 4 + 5 + 6", [(0, 24)]), "at most 4 (the block size)"),
    (lambda rt: rt.infill("", ""), "needs a prefix or a suffix"),
    (lambda rt: rt.infill("x", "y", length=5), "fill length must be in 0..4"),
    (lambda rt: rt.infill("x", "y", max_length=0), "maximum fill length must be in 1..4"),
    (lambda rt: rt.infill([1, 10**6], "y"), "invalid token id 1000000"),
    (lambda rt: rt.infill("x", "y", mode="ar"), "infill/edit take no mode"),
    (lambda rt: rt.infill("x", "y", steps=9), "--steps must be in 1..4"),
])
def test_bad_input(rt, call, match):
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call(rt)


def test_cli(tiny_ckpt, tmp_path, capsys):
    assert cli.main(["infill", "--model", str(tiny_ckpt), "--prefix", "def f(", "--suffix", "):", "--length", "2",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "infill" and len(out["output_ids"]) <= 2 and out["nfe"] <= 3
    src = tmp_path / "note.txt"
    src.write_text("x = 1 + 2\n")
    dst = tmp_path / "out.txt"
    assert cli.main(["edit", "--model", str(tiny_ckpt), "--file", str(src), "--span", "4:5", "-o", str(dst)]) == 0
    assert dst.read_text().startswith("x = ") and dst.read_text().endswith(" + 2\n")
    capsys.readouterr()
    for argv, match in [(["edit", "--text", "x = 1", "--span", "4-5"], "is not START:END"),
                        (["edit", "--text", "x = 1", "--span", "9:10"], "is not inside the text"),
                        (["edit", "--text", "   ", "--span", "0:1"], "the text to edit is empty"),
                        (["infill", "--length", "2"], "infill needs --prefix"),
                        (["infill", "--prefix", "x", "--length", "99"], "fill length must be in"),
                        (["infill", "--prefix-file", str(tmp_path / "missing")], "cannot read the prefix file")]:
        assert cli.main([argv[0], "--model", str(tiny_ckpt), *argv[1:]]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err


def test_server_suffix_and_edits(tiny_ckpt):
    import threading
    import urllib.error
    import urllib.request

    from edge_dlm.server.app import build_server

    rt = edge_dlm.load(tiny_ckpt, device="cpu", dtype="float32")
    server = build_server(rt, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/v1{path}", json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        status, out = post("/completions", {"prompt": "def f(", "suffix": "):\n", "max_tokens": 2, "steps": 2})
        want = rt.infill("def f(", "):\n", max_length=2, steps=2)
        assert status == 200 and out["choices"][0]["text"] == want.text and out["usage"]["nfe"] == want.nfe
        status, out = post("/edits", {"input": "x = 1 + 2\n", "spans": [[4, 5]]})
        assert status == 200 and out["object"] == "edit" and out["choices"][0]["text"].endswith(" + 2\n")
        for path, body, match in [
                ("/edits", {"input": "", "spans": [[0, 1]]}, "'input' must be a non-empty string"),
                ("/edits", {"input": "x = 1", "spans": [[3, 1]]}, "is not inside the text"),
                ("/edits", {"input": "x = 1", "spans": "0:1"}, "'spans' must be a non-empty list"),
                ("/edits", {"input": "x = 1", "spans": [[0, 1]], "mode": "ar"}, "Unrecognized request argument"),
                ("/completions", {"prompt": "x", "suffix": 5}, "'suffix' must be a string"),
                ("/completions", {"prompt": "x", "suffix": "y", "mode": "linear-spec"}, "diffusion mode only")]:
            status, out = post(path, body)
            assert status == 400 and match in out["error"]["message"], (body, out)
    finally:
        server.stop()
        server.server_close()
