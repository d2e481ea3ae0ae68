"""What clients send beyond the happy path: chunked bodies, browser pages (CORS preflights and origins),
HEAD checks, base URLs without /v1, query strings, OpenAI's model retrieval."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

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
    answer = raw(port, over + b"0\r\n\r\n")  # the server answers once past the limit, without reading on
    assert " 413 " in answer.splitlines()[0] and "4096" in answer, answer[:300]
    # a chunk that lies about its size, a size that is not hex
    for body in (b"ff\r\n{}\r\n0\r\n\r\n", b"zz\r\n{}\r\n0\r\n\r\n"):
        answer = raw(port, body)
        assert answer.startswith("HTTP/1.") and " 400 " in answer.splitlines()[0], answer[:200]


def raw(port: int, chunked_body: bytes) -> str:
    """POST a chunked body over a plain socket; the answer, even when the server stopped reading first."""
    import socket

    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + chunked_body)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while c := s.recv(65536):
                chunks.append(c)
        except ConnectionResetError:
            pass
    return b"".join(chunks).decode("utf-8", "replace")


def test_browser_pages_local_ones_and_named_ones(serve):
    port = serve(origins=("https://notes.example", "chrome-extension://*"))
    data = json.dumps(CHAT).encode()
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "app://obsidian.md", "https://notes.example",
                   "chrome-extension://abcdef"):
        status, _, headers = call(port, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert status == 204 and headers["access-control-allow-origin"] == origin, origin
        assert "POST" in headers["access-control-allow-methods"]
        assert headers["access-control-allow-headers"] == "authorization, content-type"
        status, body, headers = call(port, "POST", "/v1/chat/completions", data,
                                     {"Content-Type": "application/json", "Origin": origin})
        assert status == 200 and headers["access-control-allow-origin"] == origin
    for origin in ("https://evil.example", "http://localhost.evil.example", "https://notes.example.evil"):
        status, body, headers = call(port, "OPTIONS", "/v1/chat/completions", headers={"Origin": origin})
        assert status == 403 and "access-control-allow-origin" not in headers, origin
        status, body, _ = call(port, "POST", "/api/chat", data, {"Content-Type": "application/json", "Origin": origin})
        assert status == 403 and "--origins" in json.loads(body)["error"]  # Ollama's error shape on /api
    assert call(port, "GET", "/v1/models")[0] == 200  # no Origin: not a browser, nothing to check
    anyone = serve(origins=("*",))
    assert call(anyone, "OPTIONS", "/v1/models", headers={"Origin": "https://evil.example"})[0] == 204


def test_origin_patterns():
    assert origin_allowed("http://localhost") and origin_allowed("HTTP://LOCALHOST:11434")
    assert not origin_allowed("http://localhost.example.com") and not origin_allowed("null")
    assert origin_allowed("https://a.example", ("https://*.example",)) and not origin_allowed("https://a.example")


def test_head_base_urls_without_v1_and_query_strings(serve, rt):
    port = serve()
    for path in ("/", "/api/tags", "/api/version", "/v1/models"):
        status, body, headers = call(port, "HEAD", path)
        assert status == 200 and body == "" and int(headers["content-length"]) > 0, path
    data = json.dumps(CHAT).encode()
    want = call(port, "POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    for path in ("/chat/completions", "/v1/chat/completions?api-version=2024-10-21", "/v1/chat/completions/"):
        got = call(port, "POST", path, data, {"Content-Type": "application/json"})
        assert got[0] == 200 and json.loads(got[1])["choices"] == json.loads(want[1])["choices"], path
    status, body, _ = call(port, "GET", "/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    status, body, _ = call(port, "GET", "/v1/models/tiny")
    assert status == 200 and json.loads(body)["id"] == "tiny"
    status, body, _ = call(port, "GET", "/v1/models/gpt-4o")
    assert status == 404 and "tiny" in json.loads(body)["error"]["message"]
    assert route_of("/completions?x=1#y") == "/v1/completions"


def test_the_openai_client_with_a_base_url_without_v1(serve):
    openai = pytest.importorskip("openai", reason="the openai package (installed by `make test`)")
    port = serve()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}", api_key="none")
    assert client.models.retrieve("tiny").id == "tiny"
    r = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=4, temperature=0,
                                       extra_body={"mode": "ar"})
    assert r.choices[0].finish_reason in ("length", "stop")
