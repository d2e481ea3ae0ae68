"""Real clients against a live `edge-dlm serve`: the official `openai` and `ollama` packages, as an
editor plugin or a note-taking tool would use them."""

from __future__ import annotations

import json
import threading

import pytest

import edge_dlm
from edge_dlm.server.app import build_server

openai = pytest.importorskip("openai", reason="the openai client (the 'test' extra) is not installed")
ollama = pytest.importorskip("ollama", reason="the ollama client (the 'test' extra) is not installed")
pydantic = pytest.importorskip("pydantic", reason="pydantic (with the openai client) is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (the 'test' extra) is not installed")
pytest.importorskip("llguidance", reason="llguidance (the 'structured' extra) is not installed")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string", "maxLength": 12}},
                                                          "required": ["city"], "additionalProperties": False}}}]


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)


@pytest.fixture(scope="module")
def served():
    rt = edge_dlm.load(device="cpu", compile="off")
    server = build_server(rt, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", rt
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def oa(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def test_openai_stop_and_logprobs(served, oa):
    _, rt = served
    msgs = [{"role": "user", "content": "def parse(config):"}]
    full = rt.generate(msgs, mode="linear-spec", max_new_tokens=40).text
    stop = full[10:13]
    r = oa.chat.completions.create(model="demo", messages=msgs, max_tokens=40, stop=[stop], logprobs=True,
                                   top_logprobs=2, extra_body={"mode": "linear-spec"})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content == full[:full.find(stop)]
    assert len(c.logprobs.content) >= 1 and len(c.logprobs.content[0].top_logprobs) == 2
    ar = rt.generate(msgs, mode="ar", max_new_tokens=3, logprobs=2)
    assert abs(c.logprobs.content[0].logprob - ar.logprobs[0]["logprob"]) < 1e-5


def test_openai_streaming_equals_the_answer(oa):
    kw = dict(model="demo", messages=[{"role": "user", "content": "Hello"}], max_tokens=24, stop=["\n\n"],
              extra_body={"mode": "quadratic-spec"})
    whole = oa.chat.completions.create(**kw).choices[0].message.content
    chunks = list(oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_json_schema_and_parse(oa):
    schema = Person.model_json_schema()
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
        r = oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "a person"}], max_tokens=60,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": schema, "strict": True}},
                                       extra_body={"mode": mode})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    parsed = oa.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "a person"}],
                                       response_format=Person, max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    r = oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "json please"}], max_tokens=80,
                                   response_format={"type": "json_object"})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_openai_tool_round_trip(oa):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oa.chat.completions.create(model="demo", messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    msgs += [c.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})}]
    r = oa.chat.completions.create(model="demo", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    named = oa.chat.completions.create(model="demo", messages=msgs[:1], tools=TOOLS, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    streamed = list(oa.chat.completions.create(model="demo", messages=msgs[:1], tools=TOOLS, tool_choice="required",
                                               max_tokens=60, stream=True))
    deltas = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_openai_n_echo_and_models(oa):
    r = oa.completions.create(model="demo", prompt="def f(x):", max_tokens=8, n=3, echo=True, logprobs=2,
                              temperature=0.9, seed=3)
    assert len(r.choices) == 3 and all(c.text.startswith("def f(x):") for c in r.choices)
    assert r.choices[0].logprobs.tokens and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    m = oa.models.list().data[0]
    assert m.id and m.object == "model"
    with pytest.raises(openai.BadRequestError, match="'n' must be in 1..8"):
        oa.completions.create(model="demo", prompt="x", n=9)
    with pytest.raises(openai.APIStatusError, match="not an embedding model"):
        oa.embeddings.create(model="demo", input="x")


def test_ollama_chat_generate_list_show(served):
    base, rt = served
    o = ollama.Client(host=base)
    names = [m.model for m in o.list().models]
    assert names == [rt.name]
    assert o.show(rt.name).details.family == "nemotron-labs-diffusion"
    r = o.chat(model=rt.name, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 16, "seed": 1})
    want = rt.generate([{"role": "user", "content": "hi"}], mode="linear-spec", max_new_tokens=16).text
    assert r.message.content == want and r.done and r.eval_count > 0
    parts = list(o.chat(model=rt.name, messages=[{"role": "user", "content": "hi"}], stream=True,
                        options={"num_predict": 16}))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done
    g = o.generate(model=rt.name, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))",
                   options={"num_predict": 8})
    assert g.done and isinstance(g.response, str)
    schema = Person.model_json_schema()
    f = o.chat(model=rt.name, messages=[{"role": "user", "content": "a person"}], format=schema,
               options={"num_predict": 60})
    jsonschema.validate(json.loads(f.message.content), schema)
    # an option or field this API does not know is ignored, as Ollama does (a newer client still works)
    r = o.chat(model=rt.name, messages=[{"role": "user", "content": "hi"}], options={"bogus": 1, "num_predict": 16})
    assert r.message.content == want
    with pytest.raises(ollama.ResponseError, match="temperature"):  # a known one with a bad value is not
        o.chat(model=rt.name, messages=[{"role": "user", "content": "hi"}], options={"temperature": "hot"})
    assert o.ps().models[0].model == rt.name
