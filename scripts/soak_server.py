"""Soak `edge-dlm serve`: clients hammer an in-process server on 127.0.0.1 for a bounded time.

    .venv/bin/python scripts/soak_server.py [--model DIR] [--seconds 60] [--clients 8] [--max-tokens 16]

Each client loops over a mix: chat and completion requests (streamed and not), malformed bodies,
oversized bodies, and streams abandoned after the first chunk. At the end it prints the status
counts, latency percentiles per kind, the server's resident memory before and after, and whether
it still answers; it exits 1 on any 5xx, any client-side error other than the ones it provoked, or
a server that stopped answering. Loopback only; the run is bounded by --seconds and --max-requests.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import socket
import statistics
import sys
import threading
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def call(port: int, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def abandon(port: int, body: bytes) -> int:
    """Start a stream, read its first chunk, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = s.recv(4096)
    return int(got.split(b" ")[1]) if got.startswith(b"HTTP/") else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import edge_dlm
    from edge_dlm.server.app import ServeOptions, build_server

    rt = edge_dlm.load(a.model, device="cpu")
    server = build_server(rt, "127.0.0.1", 0, ServeOptions(queue=a.clients, queue_timeout=300))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    rss0 = rss_mib()
    msgs = [{"role": "user", "content": "Write a Python function is_even(n)."}]
    kinds = {
        "chat": lambda r: call(port, json.dumps({"messages": msgs, "max_tokens": a.max_tokens,
                                                 "mode": r.choice(["ar", "linear-spec", "diffusion"])}).encode()),
        "stream": lambda r: call(port, json.dumps({"messages": msgs, "max_tokens": a.max_tokens, "stream": True,
                                                   "mode": "quadratic-spec"}).encode()),
        "completion": lambda r: call(port, json.dumps({"prompt": "def parse(", "max_tokens": a.max_tokens}).encode(),
                                     "/v1/completions"),
        "malformed": lambda r: call(port, r.choice([b"{", b"[]", b'{"messages": 5}', b'{"prompt": "x", "n": 3}'])),
        "oversized": lambda r: call(port, json.dumps({"messages": msgs, "user": "x" * (2 << 20)}).encode()),
        "abandoned": lambda r: (abandon(port, json.dumps({"messages": msgs, "max_tokens": 4 * a.max_tokens,
                                                          "stream": True, "mode": "ar"}).encode()), b""),
    }
    expected = {"chat": {200}, "stream": {200}, "completion": {200}, "malformed": {400}, "oversized": {413},
                "abandoned": {200}}
    stats: dict[str, list[float]] = collections.defaultdict(list)
    codes: collections.Counter = collections.Counter()
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + a.seconds
    issued = [0]

    def client(i: int) -> None:
        r = random.Random(a.seed * 1000 + i)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= a.max_requests:
                    return
                issued[0] += 1
            kind = r.choice(list(kinds))
            t0 = time.monotonic()
            try:
                status, _ = kinds[kind](r)
            except (OSError, http.client.HTTPException) as exc:
                if kind != "oversized":  # the server may close an oversized upload early
                    with lock:
                        problems.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                stats[kind].append(time.monotonic() - t0)
                codes[status] += 1
                if status not in expected[kind]:
                    problems.append(f"{kind}: HTTP {status}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    samples = []  # RSS over time: a leak keeps climbing, warm-up levels off
    while any(t.is_alive() for t in threads):
        time.sleep(a.seconds / 6)
        samples.append(round(rss_mib()))
    for t in threads:
        t.join()
    alive = call(port, json.dumps({"messages": msgs, "max_tokens": 2}).encode())[0] == 200
    server.stop()
    print(f"soak: {sum(codes.values())} requests in {a.seconds:g} s from {a.clients} clients; "
          f"status {dict(sorted(codes.items()))}")
    for kind, ts in sorted(stats.items()):
        q = statistics.quantiles(ts, n=100) if len(ts) > 1 else ts * 99
        print(f"  {kind:<11} n={len(ts):<5} p50 {1000 * q[49]:8.1f} ms  p99 {1000 * q[98]:8.1f} ms")
    print(f"process RSS {rss0:.0f} MiB at start, then {samples} MiB (server and clients share the process); "
          f"still answering: {alive}")
    five = sum(v for k, v in codes.items() if k >= 500)
    if problems or five or not alive:
        print(f"FAILED: {five} 5xx; {len(problems)} problems: {problems[:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
