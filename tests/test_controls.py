"""Generation controls in every mode (`edge_dlm.decoding.controls`): stop sequences, penalties, logit
bias, logprobs and grammar constraints; the lossless modes stay equal to AR under all of them."""

from __future__ import annotations

import json

import pytest

import edge_dlm
from edge_dlm.decoding.controls import Penalties, StopFilter
from edge_dlm.primitives.errors import UserError

pytest.importorskip("llguidance", reason="llguidance (the 'structured' extra) is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (the 'test' extra) is not installed")

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
LOSSLESS = ("linear-spec", "quadratic-spec")
PROMPTS = ["Write a JSON object describing a cat.", "def parse(config):", "The capital of France is",
           "List three colours:", "Describe a person as JSON:", "import os\n", "Hello!", "Q: what is 2+2?\nA:"]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}, "label": {"type": "string", "maxLength": 6}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]}},
     "required": ["ok", "level"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                         "note": {"type": "string", "maxLength": 5}},
        "required": ["id"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def rt():
    return edge_dlm.load(device="cpu", compile="off")


def test_stop_filter_holds_back_only_a_possible_stop():
    f = StopFilter(("END", "\n\n"))
    assert f.push("abc E") == "abc " and f.held == "E"
    assert f.push("N") == "" and f.push("x") == "ENx"
    assert f.push("one\n") == "one" and f.push("\ntwo") == "" and f.stopped
    g = StopFilter(("ab",))
    assert g.push("xa") + g.flush() == "xa"  # the held tail comes out at the end


def test_a_stop_spanning_two_tokens_and_two_blocks_in_every_mode(rt):
    """A stop sequence made of the end of token 3 and the start of token 4 (block size 4: the first
    block's last token and the next block's first): every mode stops there, the text never holds it,
    and the stream equals the answer."""
    ar = rt.generate("def parse(config):", mode="ar", max_new_tokens=24)
    pieces = [rt.tokenizer.decode(ar.output_ids[:i]) for i in range(len(ar.output_ids) + 1)]
    k = next(i for i in range(4, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and i % 4 == 0)
    stop = pieces[k - 1][-1:] + pieces[k][len(pieces[k - 1]):][:2]  # ends token k-1, starts token k
    cut = ar.text[:ar.text.find(stop)]
    for mode in MODES:
        kw = dict(mode=mode, block_size=4, max_new_tokens=24, stop=[stop, "never-there"])
        r = rt.generate("def parse(config):", **kw)
        streamed = "".join(e.delta for e in rt.stream("def parse(config):", **kw) if isinstance(e, edge_dlm.Text))
        assert stop not in r.text and streamed == r.text, mode
        if mode != "diffusion":  # the lossless modes' text is AR's
            assert r.text == cut and r.finish_reason == "stop", mode


def test_penalties_and_bias_keep_the_lossless_modes_equal_to_ar(rt):
    kw = dict(max_new_tokens=40, block_size=8, repeat_penalty=1.3, repeat_last_n=32, frequency_penalty=0.4,
              presence_penalty=0.2, logit_bias={283: -100, 308: 3.0}, logprobs=3)
    for prompt in PROMPTS[:4]:
        ar = rt.generate(prompt, mode="ar", **kw)
        plain = rt.generate(prompt, mode="ar", max_new_tokens=40)
        assert ar.output_ids != plain.output_ids  # the penalties changed the answer
        assert 283 not in ar.output_ids
        for mode in LOSSLESS:
            r = rt.generate(prompt, mode=mode, **kw)
            assert r.output_ids == ar.output_ids, (prompt, mode)
            assert [d["id"] for d in r.logprobs] == r.output_ids
            for a, b in zip(r.logprobs, ar.logprobs):
                assert abs(a["logprob"] - b["logprob"]) < 1e-5 and [t for t, _ in a["top"]] == [t for t, _ in b["top"]]


@pytest.mark.parametrize("sampling", [dict(temperature=0.9, seed=11), dict(temperature=1.0, top_k=40, seed=12)])
def test_seeded_sampling_keeps_constrained_and_penalised_spec_equal_to_ar(rt, sampling):
    """Seeded sampling under penalties, a logit bias and a JSON schema: LinearSpec and QuadraticSpec emit
    AR's tokens (each pick's random number is keyed by the position it picks for), NFE reported."""
    runs = [dict(repeat_penalty=1.2, frequency_penalty=0.3, logit_bias={283: -100}),
            dict(response_format=None, json_schema=SCHEMAS[0])]
    for extra in runs:
        extra = {k: v for k, v in extra.items() if v is not None}
        kw = dict(max_new_tokens=32, block_size=8, **sampling, **extra)
        for prompt in PROMPTS[:3]:
            ar = rt.generate(prompt, mode="ar", **kw)
            for mode in LOSSLESS:
                r = rt.generate(prompt, mode=mode, **kw)
                assert r.output_ids == ar.output_ids, (prompt, mode, extra, r.nfe, ar.nfe)
            if "json_schema" in extra and ar.finish_reason == "stop":
                jsonschema.validate(json.loads(ar.text), SCHEMAS[0])


def test_min_tokens_and_ignore_eos(rt):
    short = rt.generate("Write one word.", mode="ar", max_new_tokens=200)
    assert short.finish_reason == "stop"
    n = len(short.output_ids) + 5
    for mode in MODES:
        r = rt.generate("Write one word.", mode=mode, max_new_tokens=n + 10, min_tokens=n, block_size=4)
        assert len(r.output_ids) >= n, mode
        r = rt.generate("Hello!", mode=mode, max_new_tokens=30, ignore_eos=True, block_size=4)
        assert len(r.output_ids) == 30 and r.finish_reason == "length", mode


@pytest.mark.parametrize("mode", MODES)
def test_structured_output_is_always_valid(rt, mode):
    """Every answer that finishes is valid (checked with jsonschema), and with bounded strings and
    arrays every answer finishes inside 120 tokens; the lossless modes equal constrained AR."""
    for schema in SCHEMAS:
        for prompt in PROMPTS:
            r = rt.generate(prompt, mode=mode, max_new_tokens=120, json_schema=schema, block_size=8)
            assert r.finish_reason == "stop", (mode, prompt, r.text)
            jsonschema.validate(json.loads(r.text), schema)
            if mode in LOSSLESS:
                assert r.output_ids == rt.generate(prompt, mode="ar", max_new_tokens=120, json_schema=schema,
                                                   block_size=8).output_ids


def test_regex_and_grammar_constraints(rt):
    for mode in MODES:
        r = rt.generate("The year is", mode=mode, regex=r"[12][0-9]{3}", max_new_tokens=10, block_size=4)
        assert r.finish_reason == "stop" and len(r.text) == 4 and r.text.isdigit(), (mode, r.text)
        r = rt.generate("Answer:", mode=mode, grammar='start: "yes" | "no"', max_new_tokens=10, block_size=4)
        assert r.text in ("yes", "no"), (mode, r.text)


@pytest.mark.parametrize("kw,match", [
    (dict(json_schema={"type": "nonsense"}), "not valid"),
    (dict(regex="("), "not valid"),
    (dict(grammar="start: start"), "not valid|accepts no output"),
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "object"} }} | {"x": 1}, regex="a"),
     "one constraint per request"),
    (dict(stop=["x"] * 17), "at most 16 stop sequences"),
    (dict(repeat_penalty=0), "repeat-penalty"),
    (dict(logprobs=99), "--logprobs must be"),
    (dict(logit_bias={999999: 1.0}), "outside the vocabulary"),
])
def test_bad_controls_are_one_line_errors(rt, kw, match):
    with pytest.raises(UserError, match=match) as e:
        rt.generate("hi", max_new_tokens=4, **kw)
    assert "\n" not in str(e.value)


def test_a_schema_nested_too_deep_is_refused(rt):
    schema: dict = {"type": "object"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(UserError, match="nested deeper"):
        rt.generate("hi", max_new_tokens=4, json_schema=schema)


def test_penalties_defaults_are_off():
    assert not Penalties().active and Penalties(repeat=1.1).active and not Penalties(repeat=1.1, last_n=0).active
