"""`edge-dlm serve`: the OpenAI-compatible endpoints, streaming, and bad requests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

import edge_dlm
from edge_dlm.server.app import build_server


@pytest.fixture(scope="module")
def url(tiny_ckpt):
    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    server = build_server(rt, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", rt
    server.shutdown()
    server.server_close()


def post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read().decode()


def test_models_and_chat_completion(url):
    base, rt = url
    with urllib.request.urlopen(base + "/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == rt.path.name
    status, text = post(base + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 8, "mode": "quadratic-spec"})
    out = json.loads(text)
    assert status == 200 and out["object"] == "chat.completion"
    want = rt.generate([{"role": "user", "content": "hi"}], mode="ar", max_new_tokens=8)
    assert out["choices"][0]["message"]["content"] == want.text  # lossless mode == AR
    assert out["usage"]["completion_tokens"] == len(want.output_ids) and out["usage"]["nfe"] >= 1
    assert "mean_accepted" in out["usage"]


def test_streamed_completion_concatenates_to_the_text(url):
    base, rt = url
    status, text = post(base + "/completions", {"prompt": "hello wor", "max_tokens": 10, "stream": True,
                                                "mode": "diffusion", "steps": 2})
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert status == 200 and lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == rt.generate("hello wor", raw=True, mode="diffusion", steps=2, max_new_tokens=10).text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]


def test_streamed_chat_names_the_role_first(url):
    base, rt = url
    status, text = post(base + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 6, "stream": True, "mode": "ar"})
    chunks = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert status == 200 and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        rt.generate([{"role": "user", "content": "hi"}], mode="ar", max_new_tokens=6).text


@pytest.mark.parametrize("path,body,match", [
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "mode": "turbo"}, "'mode' must be one of"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "steps": 99}, "'steps' must be in 1..64, got 99"),
    ("/chat/completions", {}, "'messages' is required"),
    ("/completions", {"prompt": "x", "stop": [1]}, "'stop' must be a string or a list of strings"),
    ("/completions", {"prompt": "x", "stop": ["s"] * 17}, "at most 16 sequences"),
    ("/completions", {"prompt": "x", "n": 9}, "'n' must be in 1..8"),
    ("/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "is not a token id"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                           "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "is not valid"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "regex": "["}, "the regex is not valid"),
    ("/chat/completions", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]},
     "answers no earlier assistant tool call"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
     "two tools are named 'f'"),
    ("/nowhere", {"prompt": "x"}, "no route"),
])
def test_bad_requests(url, path, body, match):
    base, _ = url
    with pytest.raises(urllib.error.HTTPError) as exc:
        post(base + path, body)
    assert exc.value.code in (400, 404)
    assert match in json.loads(exc.value.read())["error"]["message"]
