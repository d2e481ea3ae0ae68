"""The server under load, faults and hostile requests (loopback only, every loop bounded)."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import edge_dlm
from edge_dlm.server.app import ServeOptions, build_server, is_loopback

CHAT = {"messages": [{"role": "user", "content": "def add(a, b):"}], "temperature": 0}


class CountingModel:
    """The runtime's model with a pass counter and a fixed pass time (so timings are deterministic)."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self.model, self.delay, self.passes = model, delay, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *a, **k):
        self.passes += 1
        if self.delay:
            time.sleep(self.delay)
        return self.model(*a, **k)


def start(rt, **opts):
    server = build_server(rt, "127.0.0.1", 0, ServeOptions(**opts))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def rt(tiny_ckpt):
    return edge_dlm.load(tiny_ckpt, device="cpu")


@pytest.fixture()
def slow(tiny_ckpt):
    """A runtime whose passes take 20 ms, behind its own server."""
    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    rt.model = CountingModel(rt.model, delay=0.02)
    server = start(rt, queue=1, queue_timeout=1.0)
    yield rt, server
    server.stop()
    server.server_close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace"), dict(r.getheaders())
    finally:
        conn.close()


def post(port: int, path: str, obj, **kw):
    return request(port, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"}, **kw)


def sse_text(body: str, chat: bool = True) -> tuple[str, list[dict]]:
    lines = [ln[6:] for ln in body.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", body[-200:]
    chunks = [json.loads(ln) for ln in lines[:-1]]
    key = (lambda c: c["choices"][0]["delta"].get("content", "")) if chat else (lambda c: c["choices"][0]["text"])
    return "".join(key(c) for c in chunks if c["choices"]), chunks


# ---- fuzzing ----------------------------------------------------------------------------------------

def fuzz_value(rnd: random.Random, depth: int = 0):
    kinds = ["int", "neg", "float", "nan", "str", "bool", "null", "list", "dict", "big"]
    k = rnd.choice(kinds if depth < 3 else kinds[:7])
    return {"int": lambda: rnd.choice([0, 1, 2, 8]), "neg": lambda: -rnd.randint(1, 10**6),
            "float": lambda: rnd.choice([0.5, 1.5, 1e308, -0.0]), "nan": lambda: float("nan"),
            "str": lambda: rnd.choice(["", "x", "ar", "diffusion", "\udcff"[:0] + "\u2603" * 3, "a" * 300]),
            "bool": lambda: rnd.random() < 0.5, "null": lambda: None,
            "list": lambda: [fuzz_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))],
            "dict": lambda: {rnd.choice(["role", "content", "type", "text", "x"]): fuzz_value(rnd, depth + 1)
                             for _ in range(rnd.randint(0, 3))},
            "big": lambda: 10 ** rnd.randint(3, 30)}[k]()


FIELDS = ["messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "n", "stop",
          "mode", "steps", "threshold", "block_size", "model", "stream_options", "logprobs", "suffix", "unknown"]


def fuzz_request(rnd: random.Random):
    """(method, path, body bytes, headers) — mostly near-valid JSON with one or two fields broken."""
    r = rnd.random()
    path = rnd.choice(["/v1/chat/completions", "/v1/completions"] * 4 + ["/v1/models", "/v1/x", "/", "/v1/"])
    if r < 0.05:
        return "GET", path, None, {}
    if r < 0.15:
        raw = rnd.choice([b"{", b"[" * 5000 + b"]" * 5000, b"\xff\xfe", b"null", b"[]", b'"x"', b"{}", b"1e999"])
        return "POST", path, raw, {"Content-Type": "application/json"}
    chat = path.endswith("chat/completions")
    body = dict(CHAT) if chat else {"prompt": "def f(x):"}
    body["max_tokens"] = rnd.choice([1, 2, 4])
    body["mode"] = rnd.choice(["ar", "diffusion", "linear-spec", "quadratic-spec"])
    for _ in range(rnd.randint(0, 2)):
        body[rnd.choice(FIELDS)] = fuzz_value(rnd)
    if body.get("stream") is True:
        body["max_tokens"] = 2
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = rnd.choice([body["max_tokens"], "8"])  # keep each request short
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if rnd.random() < 0.03:  # the same body chunked (two chunks), as clients that stream a body send it
        cut = rnd.randint(0, len(data))
        raw = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (data[:cut], data[cut:]) if c) + b"0\r\n\r\n"
        return "POST", path, raw, {**headers, "Transfer-Encoding": "chunked"}
    return "POST", path, data, headers


def test_fuzzed_requests_never_get_a_5xx(rt):
    server = start(rt)
    port = server.server_port
    rnd = random.Random(1234)
    codes: dict[int, int] = {}
    try:
        for i in range(1000):
            method, path, body, headers = fuzz_request(rnd)
            status, text, _ = request(port, method, path, body, headers, timeout=30)
            codes[status] = codes.get(status, 0) + 1
            assert status < 500, (i, method, path, body[:300] if body else None, text[:300])
            assert "Traceback" not in text
            if status >= 400:
                assert json.loads(text)["error"]["message"]
        assert request(port, "GET", "/v1/models")[0] == 200  # still answering
        assert codes.get(200, 0) >= 100 and sum(v for k, v in codes.items() if 400 <= k < 500) >= 300, codes
    finally:
        server.stop()
        server.server_close()


# ---- concurrency, disconnects, limits ---------------------------------------------------------------

def test_eight_concurrent_streams_each_equal_the_request_alone(rt):
    server = start(rt)
    body = {**CHAT, "max_tokens": 24, "stream": True, "mode": "linear-spec"}
    try:
        alone, _ = sse_text(post(server.server_port, "/v1/chat/completions", body)[1])
        assert alone
        results: list = [None] * 8

        def client(i):
            results[i] = post(server.server_port, "/v1/chat/completions", body)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for status, text, _ in results:
            assert status == 200 and sse_text(text)[0] == alone
    finally:
        server.stop()
        server.server_close()


def open_stream(port: int, body: dict) -> socket.socket:
    """Send a streaming request by hand and read until the first data chunk has arrived."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


def test_client_that_leaves_mid_stream_frees_the_server_within_one_pass(slow):
    rt, server = slow
    sock = open_stream(server.server_port, {**CHAT, "max_tokens": 3000, "stream": True, "mode": "ar"})
    time.sleep(0.1)
    sock.close()
    at_close = rt.model.passes
    assert server.admission.idle.wait(5)
    assert rt.model.passes - at_close <= 2  # the pass in flight, at most one more while the close lands
    t0 = time.monotonic()
    status, text, _ = post(server.server_port, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
    assert status == 200 and time.monotonic() - t0 < 2


def test_non_streaming_client_that_leaves_is_cancelled_too(slow):
    rt, server = slow
    data = json.dumps({**CHAT, "max_tokens": 3000, "mode": "ar"}).encode()
    sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    time.sleep(0.3)
    sock.close()
    at_close = rt.model.passes
    assert server.admission.idle.wait(5) and rt.model.passes - at_close <= 2


def test_full_queue_gets_429_and_a_long_wait_503(slow):
    rt, server = slow  # queue=1, queue_timeout=1 s
    port = server.server_port
    sock = open_stream(port, {**CHAT, "max_tokens": 3000, "stream": True, "mode": "ar"})  # runs ~60 s
    waiter: list = []
    t = threading.Thread(target=lambda: waiter.append(post(port, "/v1/chat/completions", {**CHAT, "max_tokens": 2})))
    t.start()
    time.sleep(0.3)
    status, text, headers = post(port, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
    assert status == 429 and "busy" in json.loads(text)["error"]["message"] and headers["Retry-After"]
    t.join(10)
    assert waiter[0][0] == 503 and "busy for 1 s" in waiter[0][1]
    sock.close()
    assert server.admission.idle.wait(5)
    assert post(port, "/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200


def test_request_timeout(tiny_ckpt):
    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    rt.model = CountingModel(rt.model, delay=0.02)
    server = start(rt, request_timeout=0.3)
    try:
        status, text, _ = post(server.server_port, "/v1/chat/completions", {**CHAT, "max_tokens": 3000, "mode": "ar"})
        out = json.loads(text)
        assert status == 200 and out["choices"][0]["finish_reason"] == "timeout"
        assert 0 < out["usage"]["completion_tokens"] < 100
    finally:
        server.stop()
        server.server_close()


def test_limits_auth_and_no_traceback(rt, monkeypatch):
    server = start(rt, api_key="s3cret", max_body=2048)
    port = server.server_port
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    try:
        assert request(port, "GET", "/v1/models")[0] == 401
        assert request(port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(port, "GET", "/v1/models", headers=auth)[0] == 200
        big = json.dumps({**CHAT, "user": "x" * 5000}).encode()
        status, text, _ = request(port, "POST", "/v1/chat/completions", big, auth)
        assert status == 413 and "limit is 2048" in text
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Authorization", "Bearer s3cret")
        conn.endheaders()
        assert conn.getresponse().status == 411
        conn.close()

        def boom(*a, **k):
            raise RuntimeError("secret internals /home/user/model")

        monkeypatch.setattr(rt, "stream", boom)
        status, text, _ = request(port, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(), auth)
        assert status == 500 and "internal error" in text and "secret internals" not in text
        assert "Traceback" not in text
    finally:
        server.stop()
        server.server_close()


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


@pytest.mark.slow
def test_sigterm_mid_stream_exits_cleanly(tiny_ckpt):
    cmd = [sys.executable, "-m", "edge_dlm.cli", "serve", "--model", str(tiny_ckpt), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        while "http://" not in line:  # after the auto mode's reason line
            line = proc.stderr.readline()
            assert line, "the server exited before listening"
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        sock = open_stream(port, {**CHAT, "max_tokens": 4000, "stream": True, "mode": "ar"})
        proc.send_signal(signal.SIGTERM)
        sock.settimeout(30)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert proc.wait(30) == 0
        tail = rest.decode().strip().splitlines()
        assert tail[-1] == "data: [DONE]"
        last = json.loads(tail[-3][6:])
        assert last["choices"][0]["finish_reason"] == "cancelled"
        err = proc.stderr.read()
        assert "Traceback" not in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_request_whose_kv_cache_cannot_fit_is_a_400(tiny_ckpt):
    import dataclasses

    rt = edge_dlm.load(tiny_ckpt, device="cpu")
    rt.config = dataclasses.replace(rt.config, num_key_value_heads=2 * 10**8)  # as if each token cost GiBs
    server = start(rt)
    try:
        status, text, _ = post(server.server_port, "/v1/chat/completions", {**CHAT, "max_tokens": 100})
        assert status == 400 and "KV cache" in text and "lower max_new_tokens" in text
    finally:
        server.stop()
        server.server_close()
