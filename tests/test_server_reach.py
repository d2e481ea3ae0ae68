"""What clients send beyond the happy path: chunked bodies, browser pages (CORS preflights and origins),
HEAD checks, base URLs without /v1, query strings, OpenAI's model retrieval."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from helpers import raw

import edge_dlm
from edge_dlm.server.app import ServeOptions, build_server, origin_allowed, route_of

CHAT = {"messages": [{"role": "user", "content": "def add(a, b):"}], "temperature": 0, "max_tokens": 4, "mode": "ar"}


@pytest.fixture(scope="module")
def rt(tiny_ckpt):
    return edge_dlm.load(tiny_ckpt, device="cpu", name="tiny")


@pytest.fixture()
def serve(rt):
    servers = []

    def start(**opts):
        server = build_server(rt, "127.0.0.1", 0, ServeOptions(**opts))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.stop()
        server.server_close()


def call(port, method, path, body=None, headers=None, chunked=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if chunked:
            conn.request(method, path, body=iter(body), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace"), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def test_a_chunked_body_is_read_as_a_whole_one(serve):
    port = serve(max_body=4096)
    data = json.dumps(CHAT).encode()
    plain = call(port, "POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    pieces = [data[i:i + 7] for i in range(0, len(data), 7)]
    chunked = call(port, "POST", "/v1/chat/completions", pieces, {"Content-Type": "application/json"}, chunked=True)
    assert plain[0] == chunked[0] == 200
    text = lambda r: json.loads(r[1])["choices"][0]["message"]["content"]  # noqa: E731
    assert text(plain) == text(chunked)
    big = json.dumps({**CHAT, "user": "x" * 5000}).encode()
    over = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[i:i + 1000] for i in range(0, len(big), 1000)))
    answer = raw_chunked(port, over + b"0\r\n\r\n")  # the server answers once past the limit, without reading on
    assert " 413 " in answer.splitlines()[0] and "4096" in answer, answer[:300]
    # a chunk that lies about its size, a size that is not hex
    for body in (b"ff\r\n{}\r\n0\r\n\r\n", b"zz\r\n{}\r\n0\r\n\r\n"):
        answer = raw_chunked(port, body)
        assert answer.startswith("HTTP/1.") and " 400 " in answer.splitlines()[0], answer[:200]


def raw_chunked(port: int, chunked_body: bytes) -> str:
    """POST a chunked body over a plain socket (`helpers.raw`): the answer, even when the server stopped
    reading first."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return raw(port, head + chunked_body).decode("utf-8", "replace")
